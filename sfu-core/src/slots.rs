//! A vector of slots with a free list: values keep their index for their
//! whole life, a freed index is the next one handed out, and lookups are a
//! bounds check.

use std::marker::PhantomData;

/// An index into [`Slots`], typed by what it names.
pub trait SlotKey: Copy {
    fn from_index(index: usize) -> Self;
    fn index(self) -> usize;
}

/// Values of `T`, each in a slot named by a `K`.
pub struct Slots<K, T> {
    slots: Vec<Option<T>>,
    free: Vec<usize>,
    key: PhantomData<K>,
}

impl<K, T> Default for Slots<K, T> {
    fn default() -> Self {
        Slots {
            slots: Vec::new(),
            free: Vec::new(),
            key: PhantomData,
        }
    }
}

impl<K: SlotKey, T> Slots<K, T> {
    /// Stores `value` in a freed slot if there is one, else in a new one.
    pub fn insert(&mut self, value: T) -> K {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(value);
                K::from_index(i)
            }
            None => {
                self.slots.push(Some(value));
                K::from_index(self.slots.len() - 1)
            }
        }
    }

    pub fn remove(&mut self, key: K) -> Option<T> {
        let value = self.slots.get_mut(key.index())?.take()?;
        self.free.push(key.index());
        Some(value)
    }

    pub fn get(&self, key: K) -> Option<&T> {
        self.slots.get(key.index())?.as_ref()
    }

    pub fn get_mut(&mut self, key: K) -> Option<&mut T> {
        self.slots.get_mut(key.index())?.as_mut()
    }

    /// Values stored.
    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Slots held, taken or free.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (K, &T)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, v)| Some((K::from_index(i), v.as_ref()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq)]
    struct Id(usize);

    impl SlotKey for Id {
        fn from_index(index: usize) -> Self {
            Id(index)
        }
        fn index(self) -> usize {
            self.0
        }
    }

    /// A freed slot is taken by the next value; the others keep theirs.
    #[test]
    fn slots_are_reused_and_stay_put() {
        let mut slots = Slots::<Id, u32>::default();
        let a = slots.insert(1);
        let b = slots.insert(2);
        let c = slots.insert(3);
        assert_eq!(slots.remove(b), Some(2));
        assert!(slots.get(b).is_none());
        assert!(slots.remove(b).is_none(), "removed once");
        assert_eq!((slots.len(), slots.capacity()), (2, 3));
        let keys: Vec<Id> = slots.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, [a, c]);
        let d = slots.insert(4);
        assert_eq!(d, b, "the freed slot");
        *slots.get_mut(c).unwrap() += 10;
        let got: Vec<u32> = [a, c, d].iter().map(|k| *slots.get(*k).unwrap()).collect();
        assert_eq!(got, [1, 13, 4]);
        assert_eq!(slots.insert(5), Id(3), "a new slot once none is free");
        assert_eq!(slots.len(), 4);
        assert!(slots.get(Id(9)).is_none(), "out of range");
    }
}
