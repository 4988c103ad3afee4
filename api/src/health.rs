//! Node health details an agent reports with each heartbeat beyond CPU and RAM: free
//! disk, per-container usage and the Raspberry Pi firmware's throttling flags, with the
//! pure decoding of those flags into words.
//!
//! Every figure a node cannot measure is absent (`None`), never 0: a PC has no Pi
//! firmware, and a Pi with the memory cgroup disabled (the Raspberry Pi OS default on
//! older kernels) has no per-container memory. Dashboards show "unavailable".

use serde::{Deserialize, Serialize};

/// Free and total space of the file system holding `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskUsage {
    /// The directory measured (the agent's data dir, or Docker's root dir).
    pub path: String,
    /// Bytes an unprivileged process may still write.
    pub free_bytes: u64,
    /// Size of the file system in bytes.
    pub total_bytes: u64,
}

impl DiskUsage {
    /// Free space as a share of the total, 0–100; `None` for an empty file system.
    pub fn free_percent(&self) -> Option<f64> {
        (self.total_bytes > 0).then(|| self.free_bytes as f64 * 100.0 / self.total_bytes as f64)
    }
}

/// One running task container's use of the node, from Docker's stats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerUsage {
    /// Task id (the container's `bramble.task` label).
    pub task: String,
    /// CPU use as `docker stats` shows it: 100 is one full core. Absent until two
    /// samples have been taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f32>,
    /// Memory in use minus reclaimable page cache, bytes, as `docker stats` shows it.
    /// Absent when the kernel's memory cgroup is disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
}

/// What a Raspberry Pi's firmware says about power and heat: the bits of
/// `vcgencmd get_throttled` (`/sys/devices/platform/soc/soc:firmware/get_throttled`).
/// The low bits are conditions active now, bits 16–19 the same conditions since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ThrottleCondition {
    /// The supply dropped below 4.63 V: a weak power supply or a thin USB cable.
    UnderVoltage,
    /// The ARM core's frequency is capped (by heat or power).
    FrequencyCapped,
    /// The SoC is throttled (slowed down).
    Throttled,
    /// The soft temperature limit (60 °C by default on a Pi 3B+) is active.
    SoftTemperatureLimit,
}

impl ThrottleCondition {
    /// All conditions with the bit that means "now"; "since boot" is that bit + 16.
    pub const ALL: [(ThrottleCondition, u32); 4] = [
        (ThrottleCondition::UnderVoltage, 0),
        (ThrottleCondition::FrequencyCapped, 1),
        (ThrottleCondition::Throttled, 2),
        (ThrottleCondition::SoftTemperatureLimit, 3),
    ];

    /// In words, for people.
    pub fn words(self) -> &'static str {
        match self {
            ThrottleCondition::UnderVoltage => "under-voltage",
            ThrottleCondition::FrequencyCapped => "ARM frequency capped",
            ThrottleCondition::Throttled => "throttled",
            ThrottleCondition::SoftTemperatureLimit => "soft temperature limit",
        }
    }
}

/// One decoded throttling condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ThrottleNote {
    /// What.
    pub condition: ThrottleCondition,
    /// Active now (otherwise it happened since boot and is over).
    pub now: bool,
}

impl std::fmt::Display for ThrottleNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let when = if self.now { "now" } else { "occurred" };
        write!(f, "{} {when}", self.condition.words())
    }
}

/// Decodes the firmware's throttling bits. A condition active now is reported once, as
/// "now" (its "occurred" bit is always set with it); one that is over as "occurred".
/// Unknown bits are ignored.
pub fn decode_throttled(bits: u32) -> Vec<ThrottleNote> {
    ThrottleCondition::ALL
        .iter()
        .filter_map(|&(condition, bit)| {
            if bits & (1 << bit) != 0 {
                Some(ThrottleNote {
                    condition,
                    now: true,
                })
            } else if bits & (1 << (bit + 16)) != 0 {
                Some(ThrottleNote {
                    condition,
                    now: false,
                })
            } else {
                None
            }
        })
        .collect()
}

/// Parses the firmware file's text: `0x50005`, `50005` (sysfs prints hex without a
/// prefix) or `vcgencmd`'s `throttled=0x50005`.
pub fn parse_throttled(text: &str) -> Option<u32> {
    let t = text.trim();
    let t = t.strip_prefix("throttled=").unwrap_or(t);
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if t.is_empty() {
        return None;
    }
    u32::from_str_radix(t, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(bits: u32) -> Vec<String> {
        decode_throttled(bits)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn decodes_throttling_bits_into_words() {
        let table: &[(u32, &[&str])] = &[
            (0x0, &[]),
            (0x1, &["under-voltage now"]),
            (0x10000, &["under-voltage occurred"]),
            // A weak supply: under-voltage and throttling now (their "occurred" bits
            // are set too, and are not repeated).
            (0x50005, &["under-voltage now", "throttled now"]),
            // Over, but it happened since boot.
            (0x50000, &["under-voltage occurred", "throttled occurred"]),
            (0x2, &["ARM frequency capped now"]),
            (0x20000, &["ARM frequency capped occurred"]),
            (0x8, &["soft temperature limit now"]),
            (0x80000, &["soft temperature limit occurred"]),
            // Hot: capped and at the soft limit now, throttled earlier. Always in the
            // order of the conditions, whatever is now and what is over.
            (
                0xE000A,
                &[
                    "ARM frequency capped now",
                    "throttled occurred",
                    "soft temperature limit now",
                ],
            ),
            (
                0xF000F,
                &[
                    "under-voltage now",
                    "ARM frequency capped now",
                    "throttled now",
                    "soft temperature limit now",
                ],
            ),
            // Bits this release does not know are ignored.
            (0xFFF0_FFF0, &[]),
        ];
        for (bits, want) in table {
            assert_eq!(words(*bits), *want, "bits {bits:#x}");
        }
        let mut missed = words(0x10000);
        missed.extend(words(0x1));
        assert_eq!(missed, ["under-voltage occurred", "under-voltage now"]);
    }

    #[test]
    fn parses_the_firmware_file_in_its_spellings() {
        let table: &[(&str, Option<u32>)] = &[
            ("0\n", Some(0)),
            ("50005\n", Some(0x50005)),
            ("0x50005", Some(0x50005)),
            ("throttled=0x80008\n", Some(0x80008)),
            ("", None),
            ("0x", None),
            ("not hex", None),
            ("123456789", None),
        ];
        for (text, want) in table {
            assert_eq!(parse_throttled(text), *want, "{text:?}");
        }
    }

    #[test]
    fn free_percent_of_a_disk() {
        let d = DiskUsage {
            path: "/".into(),
            free_bytes: 25,
            total_bytes: 100,
        };
        assert_eq!(d.free_percent(), Some(25.0));
        let empty = DiskUsage {
            total_bytes: 0,
            ..d
        };
        assert_eq!(empty.free_percent(), None);
    }
}
