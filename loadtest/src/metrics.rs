//! Reading the server's `/metrics` (Prometheus text format), so a run can
//! be set against what the server itself counted.

use std::collections::HashMap;

/// Every sample on the server's metrics page, by series (name plus
/// labels, as written).
pub async fn scrape(base_url: &str) -> anyhow::Result<HashMap<String, f64>> {
    let text = crate::tls::http()?
        .get(format!("{base_url}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(parse(&text))
}

/// Parses Prometheus text format samples (comments skipped).
pub fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_samples_with_and_without_labels() {
        let m = super::parse(
            "# HELP x y\n# TYPE x counter\nsfu_rooms 2\nsfu_drops{reason=\"padding\"} 7\nbad line\n",
        );
        assert_eq!(m["sfu_rooms"], 2.0);
        assert_eq!(m["sfu_drops{reason=\"padding\"}"], 7.0);
        assert_eq!(m.len(), 2);
    }
}
