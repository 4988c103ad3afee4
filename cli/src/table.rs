//! Borderless tables as kubectl prints them: UPPERCASE headers, columns left-aligned and
//! separated by three spaces, no trailing blanks.

use std::fmt;

/// Gap between two columns.
const GAP: usize = 3;

/// A table being filled row by row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new<I, S>(headers: I) -> Table
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Table {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank and extra cells are kept.
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn widths(&self) -> Vec<usize> {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0; columns];
        for line in [&self.headers].into_iter().chain(&self.rows) {
            for (i, cell) in line.iter().enumerate() {
                widths[i] = widths[i].max(width(cell));
            }
        }
        widths
    }
}

/// Display width of a cell: characters, with line breaks flattened by [`cell`].
fn width(s: &str) -> usize {
    s.chars().count()
}

/// Makes a value fit on one table line (messages can hold line breaks and tabs).
pub fn cell(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let widths = self.widths();
        for line in [&self.headers].into_iter().chain(&self.rows) {
            let mut out = String::new();
            for (i, w) in widths.iter().enumerate() {
                let text = line.get(i).map(String::as_str).unwrap_or("");
                out.push_str(text);
                if i + 1 < widths.len() {
                    out.extend(std::iter::repeat_n(' ', w - width(text) + GAP));
                }
            }
            writeln!(f, "{}", out.trim_end())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_with_three_spaces_and_no_trailing_blanks() {
        let mut t = Table::new(["NAME", "STATUS", "AGE"]);
        t.row(["pi-1", "Ready", "5d"]);
        t.row(["raspberry-2", "NotReady", "45s"]);
        assert_eq!(
            t.to_string(),
            "NAME          STATUS     AGE\n\
             pi-1          Ready      5d\n\
             raspberry-2   NotReady   45s\n"
        );
    }

    #[test]
    fn empty_last_cells_leave_no_trailing_blanks() {
        let mut t = Table::new(["A", "B"]);
        t.row(["x", ""]);
        t.row(["longer", "y"]);
        assert_eq!(t.to_string(), "A        B\nx\nlonger   y\n");
    }

    #[test]
    fn width_counts_characters_not_bytes() {
        let mut t = Table::new(["N", "X"]);
        t.row(["été", "1"]);
        assert_eq!(t.to_string(), "N     X\nété   1\n");
    }

    #[test]
    fn short_and_long_rows_are_tolerated() {
        let mut t = Table::new(["A", "B"]);
        t.row(["1"]);
        t.row(["2", "3", "4"]);
        assert_eq!(t.to_string(), "A   B\n1\n2   3   4\n");
    }

    #[test]
    fn cells_are_flattened_to_one_line() {
        assert_eq!(
            cell("no node fits:\n  pi-1: cpu\tfull"),
            "no node fits: pi-1: cpu full"
        );
    }
}
