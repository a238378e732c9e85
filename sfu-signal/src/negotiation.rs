//! Offer/answer bookkeeping for a connection on which the server offers
//! (the subscriber connection): at most one offer outstanding, changes that
//! arrive meanwhile folded into the next offer, and each offer numbered so
//! the caller knows which tracks an answer covers.
//!
//! Pure state, no SDP: the room asks [`Negotiator::begin_offer`] whether to
//! create an offer now, and tells it when the answer arrives.

/// Signalling state of a server-offered connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No offer outstanding.
    Stable,
    /// Offer `n` was sent; waiting for its answer.
    HaveLocalOffer(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    #[error("no offer is awaiting an answer")]
    NoOfferOutstanding,
}

#[derive(Debug, Clone)]
pub struct Negotiator {
    state: State,
    needed: bool,
    generation: u64,
}

impl Default for Negotiator {
    fn default() -> Self {
        Negotiator {
            state: State::Stable,
            needed: false,
            generation: 0,
        }
    }
}

impl Negotiator {
    pub fn state(&self) -> State {
        self.state
    }

    /// Number of offers begun so far.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Something changed (a track added or removed): an offer is needed.
    pub fn request(&mut self) {
        self.needed = true;
    }

    pub fn is_needed(&self) -> bool {
        self.needed
    }

    /// If an offer is needed and none is outstanding, starts one and
    /// returns its generation; the caller then creates and sends it.
    pub fn begin_offer(&mut self) -> Option<u64> {
        if self.state != State::Stable || !self.needed {
            return None;
        }
        self.generation += 1;
        self.needed = false;
        self.state = State::HaveLocalOffer(self.generation);
        Some(self.generation)
    }

    /// The offer could not be created; forget it and try again on the next
    /// change.
    pub fn abandon_offer(&mut self) {
        if let State::HaveLocalOffer(_) = self.state {
            self.state = State::Stable;
            self.needed = true;
        }
    }

    /// An answer arrived; returns the generation it answers.
    pub fn on_answer(&mut self) -> Result<u64, NegotiationError> {
        match self.state {
            State::HaveLocalOffer(generation) => {
                self.state = State::Stable;
                Ok(generation)
            }
            State::Stable => Err(NegotiationError::NoOfferOutstanding),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone)]
    enum Step {
        Request,
        Begin(Option<u64>),
        Answer(Result<u64, NegotiationError>),
        Abandon,
    }

    fn run(steps: &[Step]) {
        let mut n = Negotiator::default();
        for (i, step) in steps.iter().enumerate() {
            match step {
                Step::Request => n.request(),
                Step::Begin(expected) => assert_eq!(n.begin_offer(), *expected, "step {i}"),
                Step::Answer(expected) => {
                    assert_eq!(n.on_answer(), expected.clone(), "step {i}")
                }
                Step::Abandon => n.abandon_offer(),
            }
        }
    }

    use Step::*;

    #[test]
    fn one_offer_at_a_time_and_changes_fold_into_the_next() {
        let table: &[&[Step]] = &[
            // Nothing to offer until something changes.
            &[
                Begin(None),
                Request,
                Begin(Some(1)),
                Answer(Ok(1)),
                Begin(None),
            ],
            // Changes during an outstanding offer wait for its answer.
            &[
                Request,
                Begin(Some(1)),
                Request,
                Request,
                Begin(None),
                Answer(Ok(1)),
                Begin(Some(2)),
                Answer(Ok(2)),
            ],
            // An answer with no offer is refused and changes nothing.
            &[
                Answer(Err(NegotiationError::NoOfferOutstanding)),
                Request,
                Begin(Some(1)),
            ],
            // A second answer for the same offer is refused.
            &[
                Request,
                Begin(Some(1)),
                Answer(Ok(1)),
                Answer(Err(NegotiationError::NoOfferOutstanding)),
            ],
            // An abandoned offer is retried with a new generation.
            &[
                Request,
                Begin(Some(1)),
                Abandon,
                Begin(Some(2)),
                Answer(Ok(2)),
            ],
        ];
        for steps in table {
            run(steps);
        }
    }

    #[test]
    fn state_is_visible() {
        let mut n = Negotiator::default();
        assert_eq!(n.state(), State::Stable);
        n.request();
        assert!(n.is_needed());
        n.begin_offer();
        assert_eq!(n.state(), State::HaveLocalOffer(1));
        assert!(!n.is_needed());
        assert_eq!(n.generation(), 1);
    }
}
