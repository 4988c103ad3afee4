//! "Did you mean …?" for mistyped commands and resource types.

/// The optimal string alignment distance: edits, where swapping two neighbours
/// (`gte` for `get`) counts as one.
pub fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// The candidate closest to `word`, if it is close enough to be what was meant: one
/// edit for short words, two from six letters on.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    let limit = if word.chars().count() >= 6 { 2 } else { 1 };
    candidates
        .into_iter()
        .map(|c| (distance(&word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_words_are_suggested_and_far_ones_not() {
        let cmds = [
            "get", "describe", "delete", "apply", "logs", "events", "scale",
        ];
        assert_eq!(did_you_mean("gte", cmds), Some("get"));
        assert_eq!(did_you_mean("GET", cmds), Some("get"));
        assert_eq!(did_you_mean("aply", cmds), Some("apply"));
        assert_eq!(did_you_mean("desribe", cmds), Some("describe"));
        assert_eq!(did_you_mean("delte", cmds), Some("delete"));
        assert_eq!(did_you_mean("xyz", cmds), None);
        assert_eq!(did_you_mean("lgo", cmds), None);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("nodse", "nodes"), 1);
    }
}
