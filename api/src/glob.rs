//! The globs of `sync.exclude`: paths relative to a volume, `/`-separated.
//! - `*` matches any run of characters but `/`, `?` one character but `/`;
//! - `**` matches any run of characters, `/` included, and `**/` also nothing, so
//!   `**/x` matches `x` at any depth, the top included;
//! - a pattern without `/` matches the last component at any depth (`*.lock`); a
//!   leading `/` anchors one at the volume's top (`/wallet.dat`);
//! - a trailing `/` matches directories only (`blocks/`);
//! - a directory that matches is left out with all it holds.
//!
//! Matching is a dynamic programme over (pattern, path): linear in their product,
//! whatever the stars, so no pattern can make it slow.

use std::fmt;

/// The longest pattern.
pub const MAX_LEN: usize = 256;

/// A checked pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    tokens: Vec<Token>,
    dir_only: bool,
    anywhere: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Byte(u8),
    One,
    Star,
    Stars,
    StarsSlash,
}

/// Why a pattern is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobError(&'static str);

impl fmt::Display for GlobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for GlobError {}

impl Glob {
    /// Checks and compiles `pattern`.
    pub fn new(pattern: &str) -> Result<Glob, GlobError> {
        if pattern.is_empty() || pattern == "/" {
            return Err(GlobError("empty pattern"));
        }
        if pattern.len() > MAX_LEN {
            return Err(GlobError("longer than 256 characters"));
        }
        if pattern.chars().any(|c| c.is_control()) {
            return Err(GlobError("holds a control character"));
        }
        let anchored = pattern.starts_with('/');
        let dir_only = pattern.ends_with('/');
        let body = pattern.trim_start_matches('/').trim_end_matches('/');
        if body.is_empty() {
            return Err(GlobError("empty pattern"));
        }
        if pattern.starts_with("//")
            || body
                .split('/')
                .any(|c| c == ".." || c == "." || c.is_empty())
        {
            return Err(GlobError("has an empty, '.' or '..' component"));
        }
        let anywhere = !anchored && !body.contains('/');
        let b = body.as_bytes();
        let mut tokens = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'*' if b.get(i + 1) == Some(&b'*') => {
                    if b.get(i + 2) == Some(&b'/') {
                        tokens.push(Token::StarsSlash);
                        i += 3;
                    } else {
                        tokens.push(Token::Stars);
                        i += 2;
                    }
                    while b.get(i) == Some(&b'*') {
                        i += 1;
                    }
                }
                b'*' => {
                    tokens.push(Token::Star);
                    i += 1;
                }
                b'?' => {
                    tokens.push(Token::One);
                    i += 1;
                }
                c => {
                    tokens.push(Token::Byte(c));
                    i += 1;
                }
            }
        }
        Ok(Glob {
            tokens,
            dir_only,
            anywhere,
        })
    }

    /// Whether the entry at `path` (relative, `/`-separated) is left out.
    pub fn matches(&self, path: &str, is_dir: bool) -> bool {
        if self.dir_only && !is_dir {
            return false;
        }
        let subject = if self.anywhere {
            path.rsplit('/').next().unwrap_or(path)
        } else {
            path
        };
        matches(&self.tokens, subject.as_bytes())
    }
}

/// Whether any of `globs` leaves out the entry at `path`.
pub fn excluded(globs: &[Glob], path: &str, is_dir: bool) -> bool {
    globs.iter().any(|g| g.matches(path, is_dir))
}

fn matches(tokens: &[Token], s: &[u8]) -> bool {
    // at[j]: the tokens so far can match s[..j].
    let mut at = vec![false; s.len() + 1];
    at[0] = true;
    for t in tokens {
        let mut next = vec![false; s.len() + 1];
        match t {
            Token::Byte(c) => {
                for j in 0..s.len() {
                    next[j + 1] = at[j] && s[j] == *c;
                }
            }
            Token::One => {
                for j in 0..s.len() {
                    next[j + 1] = at[j] && s[j] != b'/';
                }
            }
            Token::Star => {
                let mut run = false;
                for j in 0..=s.len() {
                    run = at[j] || (run && j > 0 && s[j - 1] != b'/');
                    next[j] = run;
                }
            }
            Token::Stars => {
                let mut run = false;
                for j in 0..=s.len() {
                    run = run || at[j];
                    next[j] = run;
                }
            }
            Token::StarsSlash => {
                // Nothing, or anything ending in '/'.
                let mut seen = false;
                for j in 0..=s.len() {
                    if j > 0 && s[j - 1] == b'/' && seen {
                        next[j] = true;
                    }
                    seen = seen || at[j];
                    next[j] = next[j] || at[j];
                }
            }
        }
        at = next;
    }
    at[s.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, path: &str, dir: bool) -> bool {
        Glob::new(p).expect("valid").matches(path, dir)
    }

    #[test]
    fn stars_questions_and_depth() {
        assert!(m("*.lock", ".lock", false));
        assert!(m("*.lock", "a/b/c.lock", false), "no '/': any depth");
        assert!(!m("*.lock", "a.lock.bak", false));
        assert!(m("blocks/*.dat", "blocks/blk0.dat", false));
        assert!(
            !m("blocks/*.dat", "blocks/x/blk0.dat", false),
            "* stops at /"
        );
        assert!(!m("blocks/*.dat", "x/blocks/blk0.dat", false), "anchored");
        assert!(m("blocks/**", "blocks/x/y.dat", false));
        assert!(m("**/cache", "cache", true));
        assert!(m("**/cache", "a/b/cache", true));
        assert!(!m("**/cache", "a/bcache", true));
        assert!(m("a/**/z", "a/z", false));
        assert!(m("a/**/z", "a/b/c/z", false));
        assert!(m("debug.lo?", "debug.log", false));
        assert!(!m("debug.lo?", "debug.lo", false));
        assert!(!m("a?b", "a/b", false), "? is not /");
    }

    #[test]
    fn a_leading_slash_anchors_at_the_top() {
        assert!(m("/wallet.dat", "wallet.dat", false));
        assert!(!m("/wallet.dat", "backup/wallet.dat", false));
        assert!(m("wallet.dat", "backup/wallet.dat", false));
        assert!(m("/database/", "database", true));
        assert!(!m("/database/", "x/database", true));
    }

    #[test]
    fn a_trailing_slash_matches_directories_only() {
        assert!(m("chainstate/", "chainstate", true));
        assert!(!m("chainstate/", "chainstate", false));
        assert!(
            m("chainstate/", "x/chainstate", true),
            "no inner '/': any depth"
        );
        assert!(m("blocks/index/", "blocks/index", true));
    }

    #[test]
    fn bad_patterns_are_refused_with_a_reason() {
        for p in [
            "", "/", "//", "//x", "../x", "/../x", "a/../b", "a//b", "./a", "x\ny",
        ] {
            assert!(Glob::new(p).is_err(), "{p:?}");
        }
        assert!(Glob::new(&"a".repeat(300)).is_err());
    }

    #[test]
    fn many_stars_stay_linear() {
        let g = Glob::new(&"*a".repeat(100)).expect("valid");
        let path = "a".repeat(99) + "b";
        let t = std::time::Instant::now();
        assert!(!g.matches(&path, false));
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }
}
