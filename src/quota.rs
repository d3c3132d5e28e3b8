//! The monthly quota period (SPEC §4) and the rate-limit fields derived from it (SPEC §7).
//! Pure calendar arithmetic on UTC; the counting itself lives in the store.

use std::fmt;
use std::time::SystemTime;

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};

use crate::clock::unix_secs;

/// One UTC calendar month: the unit quota is counted in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    pub year: i32,
    /// 1–12.
    pub month: u32,
}

impl Period {
    /// The month of `t` (a time before 1970 counts as January 1970, as `unix_secs` does).
    pub fn containing(t: SystemTime) -> Self {
        let (year, month) = civil_month((unix_secs(t) / 86_400) as i64);
        Self { year, month }
    }

    pub fn next(self) -> Self {
        if self.month == 12 {
            Self {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Self {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// Unix seconds of the first instant of the month.
    pub fn start_unix(self) -> i64 {
        if !(1..=12).contains(&self.month) {
            return i64::MAX;
        }
        days_to_month(self.year, self.month) * 86_400
    }

    /// Unix seconds of the first instant of the next month, when this period's quota resets.
    pub fn reset_unix(self) -> i64 {
        self.next().start_unix()
    }

    /// Length of the month in seconds: the `w` of `RateLimit-Policy`.
    pub fn window_secs(self) -> u64 {
        (self.reset_unix() - self.start_unix()) as u64
    }

    /// The reset instant in RFC 3339, as the 429 body's `reset_at`.
    pub fn reset_rfc3339(self) -> String {
        DateTime::<Utc>::from_timestamp(self.reset_unix(), 0)
            .map(|d| d.to_rfc3339_opts(SecondsFormat::Secs, true))
            .unwrap_or_default()
    }

    /// Whole seconds from `now` to the reset, at least 1 (a `Retry-After` of 0 invites a spin).
    pub fn secs_to_reset(self, now: SystemTime) -> u64 {
        (self.reset_unix() - unix_secs(now) as i64).max(1) as u64
    }
}

// Every call derives its month, the month's bounds and the reset from the clock; the
// proleptic Gregorian calendar in integers (H. Hinnant's `days_from_civil` and
// `civil_from_days`, with March as the first month of the computing year so that the leap
// day comes last) costs a tenth of the instructions of going through chrono's dates, which
// the tests keep as the oracle.

/// Days from 1970-01-01 to the first day of `month` (1–12) of `year`.
fn days_to_month(year: i32, month: u32) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let shifted_month = i64::from((month + 9) % 12); // March is 0
    let day_of_year = (153 * shifted_month + 2) / 5; // of the 1st of the month
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The year and month (1–12) of the day `days` after 1970-01-01.
fn civil_month(days: i64) -> (i32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153; // March is 0
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year as i32, month as u32)
}

/// A UTC day, as days since the Unix epoch: the unit of usage history (SPEC §9).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Day(pub u32);

impl Day {
    /// How long the stores keep a day's count (the spec asks for at least 90 days).
    pub const KEPT: u32 = 100;

    pub fn containing(t: SystemTime) -> Self {
        Day((unix_secs(t) / 86_400) as u32)
    }

    /// `YYYY-MM-DD`, or `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != 10 {
            return None;
        }
        let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1)?;
        u32::try_from((date - epoch).num_days()).ok().map(Day)
    }

    /// Unix seconds of the day's end.
    pub fn end_unix(self) -> i64 {
        (i64::from(self.0) + 1) * 86_400
    }
}

/// `YYYY-MM-DD`.
impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let date =
            DateTime::<Utc>::from_timestamp(i64::from(self.0) * 86_400, 0).unwrap_or_default();
        write!(f, "{}", date.format("%Y-%m-%d"))
    }
}

/// `YYYY-MM`, the period's name in storage and in the admin API.
impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// What the store answered to a reservation of one unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// The unit is ours; `used` counts it.
    Granted { used: u64 },
    /// The month's quota is used up; nothing was counted.
    Denied { used: u64 },
    /// Refused for now, though the month's quota is not used up: the rest is leased to other
    /// nodes (which use it or give it back within seconds) or this key is too busy to wait
    /// for. Nothing was counted; the client is told to retry in a second (SPEC §4a.7).
    Held,
}

/// Where a served unit came from, so a call that fails afterwards gives it back there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Units leased from the store: already counted against the limit.
    Lease,
    /// Admitted by this node alone while the store was unreachable (fail-open).
    Local,
}

/// The answer to a local admission while the store is unreachable (fail-open, SPEC §4a.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalAdmission {
    Admitted {
        used: u64,
        source: Source,
    },
    /// The month's quota is used up as far as this node knows.
    Exhausted {
        used: u64,
    },
    /// Not admitted: this node never saw the key's usage this month, or it has spent the one
    /// block an outage allows.
    Refused,
}

/// The facts behind the IETF `RateLimit` and `RateLimit-Policy` fields of one response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateInfo {
    pub limit: u64,
    pub remaining: u64,
    pub window_secs: u64,
    pub reset_secs: u64,
}

impl RateInfo {
    pub fn new(limit: u64, used: u64, period: Period, now: SystemTime) -> Self {
        Self {
            limit,
            remaining: limit.saturating_sub(used),
            window_secs: period.window_secs(),
            reset_secs: period.secs_to_reset(now),
        }
    }

    /// `RateLimit-Policy: "monthly";q=<limit>;w=<secs>`
    pub fn policy_header(&self) -> Field {
        Field::monthly(b'q', self.limit, b'w', self.window_secs)
    }

    /// `RateLimit: "monthly";r=<remaining>;t=<secs to reset>`
    pub fn state_header(&self) -> Field {
        Field::monthly(b'r', self.remaining, b't', self.reset_secs)
    }
}

/// A `RateLimit` field value, written on the stack: both go out with every answer of a
/// limited key, where `format!` cost more than the rest of the head.
pub struct Field {
    text: [u8; Self::MAX],
    len: usize,
}

impl Field {
    /// `"monthly";` plus two parameters of at most 20 digits each.
    const MAX: usize = 10 + 2 * (3 + 20) + 1;

    fn monthly(a: u8, x: u64, b: u8, y: u64) -> Self {
        let mut field = Self {
            text: [0; Self::MAX],
            len: 0,
        };
        let mut digits = itoa::Buffer::new();
        field.push(b"\"monthly\";");
        field.push(&[a, b'=']);
        field.push(digits.format(x).as_bytes());
        field.push(&[b';', b, b'=']);
        field.push(digits.format(y).as_bytes());
        field
    }

    fn push(&mut self, bytes: &[u8]) {
        self.text[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

impl AsRef<[u8]> for Field {
    fn as_ref(&self) -> &[u8] {
        &self.text[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Datelike;
    use std::time::{Duration, UNIX_EPOCH};

    /// Unix seconds of the first instant of `month` of `year`, by chrono (the oracle).
    fn chrono_month_start(year: i32, month: u32) -> i64 {
        NaiveDate::from_ymd_opt(year, month, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .unwrap()
            .and_utc()
            .timestamp()
    }

    proptest::proptest! {
        /// The integer calendar agrees with chrono's on every second from 1970 to 2400.
        #[test]
        fn the_month_of_any_second_is_chronos(secs in 0u64..13_574_563_200) {
            let dt: DateTime<Utc> = at(secs).into();
            let period = Period::containing(at(secs));
            proptest::prop_assert_eq!((period.year, period.month), (dt.year(), dt.month()));
            let start = chrono_month_start(dt.year(), dt.month());
            proptest::prop_assert_eq!(period.start_unix(), start);
            proptest::prop_assert!(period.start_unix() <= secs as i64);
            proptest::prop_assert!((secs as i64) < period.reset_unix());
        }

        /// And on the first day of every month of years far from now, before 1970 included.
        #[test]
        fn the_first_of_any_month_is_chronos(year in -9999i32..9999, month in 1u32..=12) {
            let chrono = NaiveDate::from_ymd_opt(year, month, 1).unwrap();
            let days = chrono.signed_duration_since(NaiveDate::from_ymd_opt(1970, 1, 1).unwrap());
            proptest::prop_assert_eq!(days_to_month(year, month), days.num_days());
            proptest::prop_assert_eq!(civil_month(days.num_days()), (year, month));
        }
    }

    #[test]
    fn every_month_starts_on_chronos_second() {
        let mut before = Period::containing(at(0));
        for year in 1970..2400 {
            for month in 1..=12 {
                let start = chrono_month_start(year, month) as u64;
                let period = Period::containing(at(start));
                assert_eq!((period.year, period.month), (year, month));
                if start > 0 {
                    assert_eq!(Period::containing(at(start - 1)), before);
                    assert_eq!(before.next(), period);
                    assert_eq!(before.reset_unix(), start as i64);
                }
                before = period;
            }
        }
    }

    #[test]
    fn a_period_that_names_no_month_never_starts() {
        assert_eq!(
            Period {
                year: 2026,
                month: 13
            }
            .start_unix(),
            i64::MAX
        );
        assert_eq!(
            Period {
                year: 2026,
                month: 0
            }
            .start_unix(),
            i64::MAX
        );
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn days_are_utc_calendar_days() {
        let day = Day::containing(at(1_795_000_000));
        assert_eq!(day.to_string(), "2026-11-18");
        assert_eq!(Day::parse("2026-11-18"), Some(day));
        assert_eq!(Day::containing(at(day.end_unix() as u64 - 1)), day);
        assert_eq!(Day::containing(at(day.end_unix() as u64)), Day(day.0 + 1));
        for bad in ["2026-11-31", "2026-1-18", "18-11-2026", "", "1969-12-31"] {
            assert_eq!(Day::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn periods_follow_the_utc_calendar() {
        // 2026-11-30T23:59:59Z and one second later.
        let last = at(1_796_083_199);
        let first = at(1_796_083_200);
        assert_eq!(Period::containing(last).to_string(), "2026-11");
        assert_eq!(Period::containing(first).to_string(), "2026-12");
        assert_eq!(
            Period::containing(last).reset_rfc3339(),
            "2026-12-01T00:00:00Z"
        );
        assert_eq!(Period::containing(last).secs_to_reset(last), 1);
        assert_eq!(
            Period::containing(first).reset_rfc3339(),
            "2027-01-01T00:00:00Z"
        );
    }

    #[test]
    fn month_lengths() {
        let p = |year, month| Period { year, month };
        assert_eq!(p(2026, 2).window_secs(), 28 * 86_400);
        assert_eq!(p(2028, 2).window_secs(), 29 * 86_400);
        assert_eq!(p(2026, 11).window_secs(), 30 * 86_400);
        assert_eq!(p(2026, 12).window_secs(), 31 * 86_400);
        assert_eq!(p(2026, 12).next(), p(2027, 1));
    }

    #[test]
    fn rate_headers() {
        let now = at(1_796_083_100); // 99 s before December
        let info = RateInfo::new(50, 20, Period::containing(now), now);
        assert_eq!(info.policy_header().as_ref(), b"\"monthly\";q=50;w=2592000");
        assert_eq!(info.state_header().as_ref(), b"\"monthly\";r=30;t=100");
        let widest = RateInfo {
            limit: u64::MAX,
            remaining: u64::MAX,
            window_secs: u64::MAX,
            reset_secs: u64::MAX,
        };
        let max = u64::MAX.to_string();
        let expected = format!("\"monthly\";q={max};w={max}");
        assert_eq!(widest.policy_header().as_ref(), expected.as_bytes());
        assert_eq!(
            RateInfo::new(5, 9, Period::containing(now), now).remaining,
            0
        );
    }
}
