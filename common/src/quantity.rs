//! Resource quantities as people write them: CPU in cores or millicores (`0.5`, `500m`) and
//! sizes with binary or decimal units (`512MiB`, `10GiB`, `1G`, `1048576`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("{field}: must not be empty")]
    Empty { field: &'static str },
    #[error("{field}: {value:?} is not a number of cores like 0.5, 2 or 250m")]
    BadCpu { field: &'static str, value: String },
    #[error("{field}: {value:?} is not a size like 512MiB, 10GiB, 1G or a number of bytes")]
    BadBytes { field: &'static str, value: String },
    #[error("{field}: must be greater than zero")]
    Zero { field: &'static str },
    #[error("{field}: {value:?} is too large")]
    TooLarge { field: &'static str, value: String },
}

/// CPU in thousandths of a core: `500` is half a core.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct MilliCpu(pub u64);

impl MilliCpu {
    /// Parses `0.5`, `2`, `250m`; rejects zero, negatives, and finer than a millicore.
    pub fn parse(field: &'static str, value: &str) -> Result<Self, QuantityError> {
        let v = value.trim();
        if v.is_empty() {
            return Err(QuantityError::Empty { field });
        }
        let bad = || QuantityError::BadCpu {
            field,
            value: value.to_string(),
        };
        let millis = if let Some(m) = v.strip_suffix('m') {
            m.parse::<u64>().map_err(|_| bad())?
        } else {
            let (int, frac) = v.split_once('.').unwrap_or((v, ""));
            if int.is_empty() && frac.is_empty() {
                return Err(bad());
            }
            if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let int: u64 = if int.is_empty() {
                0
            } else {
                int.parse().map_err(|_| bad())?
            };
            let frac_millis: u64 = if frac.is_empty() {
                0
            } else {
                format!("{frac:0<3}").parse().map_err(|_| bad())?
            };
            int.checked_mul(1000)
                .and_then(|m| m.checked_add(frac_millis))
                .ok_or(QuantityError::TooLarge {
                    field,
                    value: value.to_string(),
                })?
        };
        if millis == 0 {
            return Err(QuantityError::Zero { field });
        }
        Ok(Self(millis))
    }

    /// Cores as a float, for display and JSON.
    pub fn cores(self) -> f64 {
        self.0 as f64 / 1000.0
    }
}

impl fmt::Display for MilliCpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1000) {
            write!(f, "{}", self.0 / 1000)
        } else {
            let s = format!("{}.{:03}", self.0 / 1000, self.0 % 1000);
            f.write_str(s.trim_end_matches('0'))
        }
    }
}

/// A size in bytes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Bytes(pub u64);

const UNITS: &[(&str, u64)] = &[
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
    ("K", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
    ("B", 1),
];

impl Bytes {
    /// Parses `512MiB`, `10GiB`, `1G`, `1048576`; rejects zero and unknown units.
    pub fn parse(field: &'static str, value: &str) -> Result<Self, QuantityError> {
        let v = value.trim();
        if v.is_empty() {
            return Err(QuantityError::Empty { field });
        }
        let bad = || QuantityError::BadBytes {
            field,
            value: value.to_string(),
        };
        let (number, multiplier) = UNITS
            .iter()
            .find_map(|(unit, mult)| v.strip_suffix(unit).map(|n| (n.trim(), *mult)))
            .unwrap_or((v, 1));
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: u64 = number.parse().map_err(|_| QuantityError::TooLarge {
            field,
            value: value.to_string(),
        })?;
        let bytes = n.checked_mul(multiplier).ok_or(QuantityError::TooLarge {
            field,
            value: value.to_string(),
        })?;
        if bytes == 0 {
            return Err(QuantityError::Zero { field });
        }
        Ok(Self(bytes))
    }
}

impl fmt::Display for Bytes {
    /// The largest binary unit that divides the size exactly, so `Display` then `parse` round-trips.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, mult) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if self.0 >= mult && self.0.is_multiple_of(mult) {
                return write!(f, "{}{unit}", self.0 / mult);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Bytes {
    /// A short size for people: `23.04GiB`, `512MiB`, `100B` (not meant to be parsed back).
    pub fn human(self) -> String {
        for (unit, mult) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if self.0 >= mult {
                if self.0.is_multiple_of(mult) {
                    return format!("{}{unit}", self.0 / mult);
                }
                return format!("{:.2}{unit}", self.0 as f64 / mult as f64);
            }
        }
        format!("{}B", self.0)
    }
}

impl FromStr for Bytes {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse("size", s)
    }
}

impl FromStr for MilliCpu {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse("cpu", s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_accepts_cores_and_millicores() {
        assert_eq!(MilliCpu::parse("cpu", "0.5").unwrap(), MilliCpu(500));
        assert_eq!(MilliCpu::parse("cpu", "0.25").unwrap(), MilliCpu(250));
        assert_eq!(MilliCpu::parse("cpu", "250m").unwrap(), MilliCpu(250));
        assert_eq!(MilliCpu::parse("cpu", "2").unwrap(), MilliCpu(2000));
        assert_eq!(MilliCpu::parse("cpu", ".1").unwrap(), MilliCpu(100));
        assert_eq!(MilliCpu(2500).to_string(), "2.5");
        assert_eq!(MilliCpu(2000).to_string(), "2");
        assert_eq!(MilliCpu(250).to_string(), "0.25");
    }

    #[test]
    fn cpu_refuses_zero_negative_and_garbage_naming_the_field() {
        for bad in ["0", "0m", "-1", "abc", "1.0001", "", "1e3", "."] {
            let err = MilliCpu::parse("cpu", bad).unwrap_err().to_string();
            assert!(err.starts_with("cpu:"), "{bad}: {err}");
        }
        assert_eq!(
            MilliCpu::parse("cpu", "0").unwrap_err().to_string(),
            "cpu: must be greater than zero"
        );
    }

    #[test]
    fn bytes_accept_binary_and_decimal_units() {
        assert_eq!(Bytes::parse("memory", "512MiB").unwrap(), Bytes(512 << 20));
        assert_eq!(Bytes::parse("memory", "10GiB").unwrap(), Bytes(10 << 30));
        assert_eq!(Bytes::parse("memory", "1Gi").unwrap(), Bytes(1 << 30));
        assert_eq!(Bytes::parse("memory", "1G").unwrap(), Bytes(1_000_000_000));
        assert_eq!(Bytes::parse("memory", "4096").unwrap(), Bytes(4096));
        assert_eq!(Bytes::parse("memory", "256 MiB").unwrap(), Bytes(256 << 20));
    }

    #[test]
    fn bytes_refuse_zero_negative_unknown_units_and_overflow() {
        for bad in [
            "0",
            "0GiB",
            "-1GiB",
            "1XB",
            "GiB",
            "1.5GiB",
            "",
            "99999999999TiB",
        ] {
            let err = Bytes::parse("storage", bad).unwrap_err().to_string();
            assert!(err.starts_with("storage:"), "{bad}: {err}");
        }
    }

    #[test]
    fn bytes_human_is_short() {
        assert_eq!(Bytes(24159368 << 10).human(), "23.04GiB");
        assert_eq!(Bytes(512 << 20).human(), "512MiB");
        assert_eq!(Bytes(0).human(), "0B");
    }

    #[test]
    fn bytes_display_round_trips() {
        for b in [
            Bytes(512 << 20),
            Bytes(10 << 30),
            Bytes(1000),
            Bytes(3 << 10),
        ] {
            assert_eq!(Bytes::parse("x", &b.to_string()).unwrap(), b);
        }
    }
}
