//! Resource quantities in the Kubernetes notation: CPU as cores or millicores
//! (`2`, `1.5`, `250m`), memory as bytes with a binary or decimal suffix
//! (`64Mi`, `1Gi`, `500M`, `1048576`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a quantity string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("empty quantity")]
    Empty,
    #[error("invalid cpu quantity {0:?}: expected cores (`2`, `1.5`) or millicores (`250m`)")]
    Cpu(String),
    #[error("invalid memory quantity {0:?}: expected bytes with an optional suffix (`64Mi`, `1Gi`, `500M`)")]
    Memory(String),
    #[error("quantity {0:?} is too large")]
    Overflow(String),
}

/// CPU in millicores: `1000` is one core.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cpu(pub u64);

impl Cpu {
    /// Whole cores, as millicores.
    pub const fn cores(n: u64) -> Self {
        Cpu(n * 1000)
    }
    /// Millicores.
    pub const fn millis(self) -> u64 {
        self.0
    }
}

/// Memory in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Memory(pub u64);

impl Memory {
    /// Mebibytes, as bytes.
    pub const fn mib(n: u64) -> Self {
        Memory(n * 1024 * 1024)
    }
    /// Bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

/// Parses a non-negative decimal number with at most `scale_digits` fractional digits and
/// returns it multiplied by `10^scale_digits`.
fn parse_fixed(s: &str, scale_digits: u32) -> Option<u128> {
    if s.is_empty() || s.starts_with('+') || s.starts_with('-') {
        return None;
    }
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if frac.len() as u32 > scale_digits {
        return None;
    }
    let int_v: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut frac_v: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    for _ in frac.len() as u32..scale_digits {
        frac_v = frac_v.checked_mul(10)?;
    }
    int_v
        .checked_mul(10u128.pow(scale_digits))?
        .checked_add(frac_v)
}

impl FromStr for Cpu {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.is_empty() {
            return Err(QuantityError::Empty);
        }
        let millis = if let Some(m) = t.strip_suffix('m') {
            parse_fixed(m, 0).ok_or_else(|| QuantityError::Cpu(s.to_string()))?
        } else {
            parse_fixed(t, 3).ok_or_else(|| QuantityError::Cpu(s.to_string()))?
        };
        let millis = u64::try_from(millis).map_err(|_| QuantityError::Overflow(s.to_string()))?;
        if millis > 1_000_000_000 {
            return Err(QuantityError::Overflow(s.to_string()));
        }
        Ok(Cpu(millis))
    }
}

const MEMORY_SUFFIXES: &[(&str, u64)] = &[
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("k", 1_000),
    ("K", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
];

impl FromStr for Memory {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.is_empty() {
            return Err(QuantityError::Empty);
        }
        let (num, mult) = MEMORY_SUFFIXES
            .iter()
            .find_map(|(suf, mult)| t.strip_suffix(suf).map(|n| (n, *mult)))
            .unwrap_or((t, 1));
        // Fractions are allowed with a suffix (`1.5Gi`), to a resolution of 1/1000.
        let scaled = parse_fixed(num, 3).ok_or_else(|| QuantityError::Memory(s.to_string()))?;
        let bytes = scaled
            .checked_mul(u128::from(mult))
            .ok_or_else(|| QuantityError::Overflow(s.to_string()))?;
        if bytes % 1000 != 0 {
            return Err(QuantityError::Memory(s.to_string()));
        }
        let bytes =
            u64::try_from(bytes / 1000).map_err(|_| QuantityError::Overflow(s.to_string()))?;
        Ok(Memory(bytes))
    }
}

impl fmt::Display for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1000) {
            write!(f, "{}", self.0 / 1000)
        } else {
            write!(f, "{}m", self.0)
        }
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (suf, mult) in [
            ("Ti", 1u64 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ] {
            if self.0 >= mult && self.0.is_multiple_of(mult) {
                return write!(f, "{}{}", self.0 / mult, suf);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Memory {
    /// A short human form for tables (`1.5Gi`, `312Mi`), rounded.
    pub fn human(self) -> String {
        let b = self.0 as f64;
        for (suf, mult) in [
            ("Ti", (1u64 << 40) as f64),
            ("Gi", (1u64 << 30) as f64),
            ("Mi", (1u64 << 20) as f64),
            ("Ki", 1024.0),
        ] {
            if b >= mult {
                let v = b / mult;
                return if v >= 10.0 {
                    format!("{:.0}{}", v, suf)
                } else {
                    format!("{:.1}{}", v, suf)
                };
            }
        }
        format!("{}", self.0)
    }
}

/// Accepts a string (`"250m"`, `"64Mi"`) or a plain number (`2`, `0.5`; bytes for memory).
#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    U(u64),
    F(f64),
    S(String),
}

fn num_to_string(v: NumOrStr) -> String {
    match v {
        NumOrStr::U(u) => u.to_string(),
        NumOrStr::F(f) => format!("{f}"),
        NumOrStr::S(s) => s,
    }
}

impl<'de> Deserialize<'de> for Cpu {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = num_to_string(NumOrStr::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "invalid cpu quantity: expected a string like `250m` or a number of cores",
            )
        })?);
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for Memory {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = num_to_string(NumOrStr::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "invalid memory quantity: expected a string like `64Mi` or a number of bytes",
            )
        })?);
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Cpu {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Serialize for Memory {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu() {
        let ok = [
            ("250m", 250),
            ("1", 1000),
            ("1.5", 1500),
            ("0.001", 1),
            ("2", 2000),
            (".5", 500),
            ("0m", 0),
        ];
        for (s, want) in ok {
            assert_eq!(s.parse::<Cpu>(), Ok(Cpu(want)), "{s}");
        }
        for bad in [
            "", "abc", "-1", "1.2345", "1.5m", "m", "1e3", "+1", "1 m", ".",
        ] {
            assert!(bad.parse::<Cpu>().is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn parses_memory() {
        let ok = [
            ("64Mi", 64 << 20),
            ("1Gi", 1 << 30),
            ("1.5Gi", 3 << 29),
            ("500M", 500_000_000),
            ("1048576", 1_048_576),
            ("2Ki", 2048),
            ("1k", 1000),
        ];
        for (s, want) in ok {
            assert_eq!(s.parse::<Memory>(), Ok(Memory(want)), "{s}");
        }
        for bad in [
            "",
            "Mi",
            "64MB",
            "-1Mi",
            "1.5",
            "abc",
            "64 Mi",
            "1.0001Ki",
            "99999999999Ti",
        ] {
            assert!(bad.parse::<Memory>().is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["250m", "1", "1500m"] {
            let c: Cpu = s.parse().expect("valid");
            assert_eq!(c.to_string().parse::<Cpu>(), Ok(c));
        }
        for s in ["64Mi", "1Gi", "1000", "1536Mi"] {
            let m: Memory = s.parse().expect("valid");
            assert_eq!(m.to_string().parse::<Memory>(), Ok(m));
        }
        assert_eq!(Memory(64 << 20).to_string(), "64Mi");
        assert_eq!(Cpu(1500).to_string(), "1500m");
    }

    proptest::proptest! {
        #[test]
        fn cpu_display_parses_back(m in 0u64..1_000_000_000) {
            proptest::prop_assert_eq!(Cpu(m).to_string().parse::<Cpu>(), Ok(Cpu(m)));
        }
        #[test]
        fn memory_display_parses_back(b in 0u64..(1u64 << 50)) {
            proptest::prop_assert_eq!(Memory(b).to_string().parse::<Memory>(), Ok(Memory(b)));
        }
    }
}
