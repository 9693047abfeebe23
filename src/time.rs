//! Time: the injected clock and the one wire format for instants.
//!
//! Every instant on the wire is RFC 3339 UTC with exactly three fractional digits and a `Z`
//! (`2026-01-01T12:00:00.123Z`). The engine never reads the system clock itself: it is handed
//! a [`Clock`], so tests can move time without sleeping.

use std::sync::atomic::{AtomicI64, Ordering};

use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use crate::model::Millis;

/// A source of the current time in Unix milliseconds, and of a steady time that never jumps.
pub trait Clock: Send + Sync + 'static {
    /// The wall-clock time, Unix milliseconds: what is stored and shown.
    fn now(&self) -> Millis;
    /// Milliseconds on a clock that only moves forward at the pace of real time (the
    /// machine's monotonic clock), from an arbitrary origin: steps of the wall clock do not
    /// move it. Durations that must not be cut short by such a step (a lease's) are also
    /// measured on it; see `store::leases`.
    fn steady(&self) -> Millis;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as Millis
    }

    fn steady(&self) -> Millis {
        static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        ORIGIN
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis() as Millis
    }
}

/// A clock that moves only when told to (tests). [`ManualClock::advance`] moves both its
/// times, as real time passing does; [`ManualClock::step`] moves the wall clock alone, as an
/// NTP step or a restored VM does.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicI64,
    steady: AtomicI64,
}

impl ManualClock {
    pub fn new(start: Millis) -> Self {
        ManualClock {
            now: AtomicI64::new(start),
            steady: AtomicI64::new(0),
        }
    }

    pub fn advance(&self, ms: i64) {
        self.steady.fetch_add(ms, Ordering::SeqCst);
        self.now.fetch_add(ms, Ordering::SeqCst);
    }

    /// Steps the wall clock by `ms` (negative: back) without time passing.
    pub fn step(&self, ms: i64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Millis {
        self.now.load(Ordering::SeqCst)
    }

    fn steady(&self) -> Millis {
        self.steady.load(Ordering::SeqCst)
    }
}

/// Formats an instant as `YYYY-MM-DDTHH:MM:SS.mmmZ` (years 0-9999; on every hot path, so
/// written digit by digit rather than through `format!`).
pub fn format(ms: Millis) -> String {
    let dt = OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (0..width).rev() {
            b[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, dt.year().clamp(0, 9999) as u32);
    put(5, 2, dt.month() as u32);
    put(8, 2, dt.day() as u32);
    put(11, 2, dt.hour() as u32);
    put(14, 2, dt.minute() as u32);
    put(17, 2, dt.second() as u32);
    put(20, 3, dt.millisecond() as u32);
    // One allocation of the final size (collecting chars grew the string several times).
    String::from_utf8_lossy(&b).into_owned()
}

/// Parses an RFC 3339 instant (any offset) to Unix milliseconds.
pub fn parse(s: &str) -> Option<Millis> {
    let dt = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    Some((dt.unix_timestamp_nanos() / 1_000_000) as Millis)
}

/// A duration as the command line writes it, `<n>[smhd]` (a bare number is seconds).
pub fn duration_of(text: &str) -> Option<std::time::Duration> {
    let (number, unit) = match text.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text, 's'),
    };
    let n: f64 = number
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)?;
    let secs = match unit {
        's' => n,
        'm' => n * 60.0,
        'h' => n * 3600.0,
        'd' => n * 86_400.0,
        _ => return None,
    };
    Some(std::time::Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_three_digits_and_z() {
        assert_eq!(format(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format(1_767_268_800_123), "2026-01-01T12:00:00.123Z");
        assert_eq!(format(951_782_400_007), "2000-02-29T00:00:00.007Z");
    }

    #[test]
    fn parses_offsets() {
        assert_eq!(parse("2026-01-01T12:00:00.123Z"), Some(1_767_268_800_123));
        assert_eq!(
            parse("2026-01-01T13:00:00.123+01:00"),
            Some(1_767_268_800_123)
        );
        assert_eq!(parse("yesterday"), None);
    }

    #[test]
    fn durations_take_a_unit_or_seconds() {
        assert_eq!(duration_of("90"), Some(std::time::Duration::from_secs(90)));
        assert_eq!(duration_of("90s"), Some(std::time::Duration::from_secs(90)));
        assert_eq!(
            duration_of("10m"),
            Some(std::time::Duration::from_secs(600))
        );
        assert_eq!(
            duration_of("2h"),
            Some(std::time::Duration::from_secs(7200))
        );
        assert_eq!(
            duration_of("3d"),
            Some(std::time::Duration::from_secs(259_200))
        );
        assert_eq!(duration_of("3w"), None);
        assert_eq!(duration_of("-1s"), None);
        assert_eq!(duration_of(""), None);
    }
}
