//! A tenant's hibernation policy as the operator writes it: how long without a connection before
//! it hibernates (`idle_after`: "30s", "10m", "never") and how (`hibernate`: "stop" or "freeze").

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The shortest `idle_after`: a tenant hibernating between two queries of one client would wake
/// for nearly every one.
pub const IDLE_AFTER_MIN: Duration = Duration::from_secs(1);
/// The longest `idle_after` (a year); beyond that, say `never`.
pub const IDLE_AFTER_MAX: Duration = Duration::from_secs(365 * 24 * 3600);
/// `idle_after` when the operator does not say.
pub const IDLE_AFTER_DEFAULT: IdleAfter = IdleAfter::After(Duration::from_secs(600));

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HibernationError {
    #[error("idle_after: {0:?} is not a duration like 30s, 10m or 1h, nor \"never\"")]
    BadIdleAfter(String),
    #[error("idle_after: {value:?} must be at least {min}s and at most {max} days (or \"never\")", min = IDLE_AFTER_MIN.as_secs(), max = IDLE_AFTER_MAX.as_secs() / 86400)]
    IdleAfterRange { value: String },
    #[error("hibernate: {0:?} is not a mode; use \"stop\" or \"freeze\"")]
    BadMode(String),
}

/// How long a tenant stays awake without an open connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdleAfter {
    Never,
    After(Duration),
}

impl Default for IdleAfter {
    fn default() -> Self {
        IDLE_AFTER_DEFAULT
    }
}

impl IdleAfter {
    /// The wire form: milliseconds, 0 for never.
    pub fn as_millis(self) -> u64 {
        match self {
            IdleAfter::Never => 0,
            IdleAfter::After(d) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        }
    }

    pub fn from_millis(ms: u64) -> Self {
        if ms == 0 {
            IdleAfter::Never
        } else {
            IdleAfter::After(Duration::from_millis(ms))
        }
    }

    pub fn duration(self) -> Option<Duration> {
        match self {
            IdleAfter::Never => None,
            IdleAfter::After(d) => Some(d),
        }
    }
}

impl FromStr for IdleAfter {
    type Err = HibernationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let v = s.trim();
        if v.eq_ignore_ascii_case("never") {
            return Ok(IdleAfter::Never);
        }
        let d =
            humantime::parse_duration(v).map_err(|_| HibernationError::BadIdleAfter(s.into()))?;
        if !(IDLE_AFTER_MIN..=IDLE_AFTER_MAX).contains(&d) {
            return Err(HibernationError::IdleAfterRange { value: s.into() });
        }
        Ok(IdleAfter::After(d))
    }
}

impl fmt::Display for IdleAfter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdleAfter::Never => f.write_str("never"),
            IdleAfter::After(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

/// What hibernating does to the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HibernateMode {
    /// The engine stops gracefully: its memory is freed; volume, cgroup and port stay.
    #[default]
    Stop,
    /// The cgroup is frozen: memory is kept and the engine resumes in milliseconds.
    Freeze,
}

impl HibernateMode {
    pub fn as_str(self) -> &'static str {
        match self {
            HibernateMode::Stop => "stop",
            HibernateMode::Freeze => "freeze",
        }
    }
}

impl FromStr for HibernateMode {
    type Err = HibernationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "stop" => Ok(HibernateMode::Stop),
            "freeze" => Ok(HibernateMode::Freeze),
            _ => Err(HibernationError::BadMode(s.into())),
        }
    }
}

impl fmt::Display for HibernateMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_after_parses_durations_and_never_and_names_the_field_on_bad_input() {
        assert_eq!("never".parse(), Ok(IdleAfter::Never));
        assert_eq!("30s".parse(), Ok(IdleAfter::After(Duration::from_secs(30))));
        assert_eq!("10m".parse::<IdleAfter>().unwrap().as_millis(), 600_000);
        for bad in ["", "soon", "-1s", "10 parsecs"] {
            let e = bad.parse::<IdleAfter>().unwrap_err().to_string();
            assert!(e.starts_with("idle_after: "), "{e}");
        }
        for out_of_range in ["0s", "500ms", "400days"] {
            let e = out_of_range.parse::<IdleAfter>().unwrap_err();
            assert!(
                matches!(e, HibernationError::IdleAfterRange { .. }),
                "{out_of_range}: {e}"
            );
        }
    }

    #[test]
    fn idle_after_round_trips_through_the_wire_form_and_display() {
        for v in [IdleAfter::Never, IdleAfter::After(Duration::from_secs(90))] {
            assert_eq!(IdleAfter::from_millis(v.as_millis()), v);
            assert_eq!(v.to_string().parse::<IdleAfter>(), Ok(v));
        }
        assert_eq!(IdleAfter::default().to_string(), "10m");
    }

    #[test]
    fn modes_parse_and_refuse_others_by_name() {
        assert_eq!("freeze".parse(), Ok(HibernateMode::Freeze));
        assert_eq!(HibernateMode::default(), HibernateMode::Stop);
        assert_eq!(
            "pause".parse::<HibernateMode>().unwrap_err().to_string(),
            "hibernate: \"pause\" is not a mode; use \"stop\" or \"freeze\""
        );
    }
}
