//! Recent node history for the dashboard's sparklines, in memory only: per node, one
//! hour of CPU, RAM used and temperature at 10 s resolution. Heartbeats (every 500 ms
//! by default) are averaged into 10-second buckets; a closed bucket becomes one point.
//! Never written to the store: an SD card must not wear out at rest, and a restarted
//! controller simply starts a fresh hour.
//!
//! Memory: 360 points of 16 bytes per node, about 6 KB; 100 nodes stay under 1 MB.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bramble_api::wire::NodeMetrics;
use serde::Serialize;

/// Seconds per point.
pub const STEP_SECS: i64 = 10;

/// Points kept per node: one hour.
pub const POINTS: usize = 360;

/// What a heartbeat adds to its node's history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    cpu_percent: f32,
    memory_used_bytes: u64,
    temperature_celsius: Option<f32>,
}

impl From<&NodeMetrics> for Sample {
    fn from(m: &NodeMetrics) -> Sample {
        Sample {
            cpu_percent: m.cpu_percent,
            memory_used_bytes: m.memory_used_bytes,
            temperature_celsius: m.temperature_celsius,
        }
    }
}

/// A fixed-capacity ring: pushing onto a full one drops the oldest item.
#[derive(Debug, Clone)]
pub struct Ring<T> {
    items: VecDeque<T>,
    cap: usize,
}

impl<T> Ring<T> {
    /// Empty, holding at most `cap` items (at least one).
    pub fn new(cap: usize) -> Ring<T> {
        let cap = cap.max(1);
        Ring {
            items: VecDeque::with_capacity(cap),
            cap,
        }
    }

    /// Appends, dropping the oldest item when full.
    pub fn push(&mut self, item: T) {
        if self.items.len() == self.cap {
            self.items.pop_front();
        }
        self.items.push_back(item);
    }

    /// Oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.items.iter()
    }

    /// The newest item.
    pub fn last(&self) -> Option<&T> {
        self.items.back()
    }

    /// How many items it holds.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// One 10-second point: averages over the heartbeats of that bucket.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// Start of the bucket, Unix seconds (controller clock).
    pub t: i64,
    /// CPU use over all cores, 0–100.
    pub cpu: f32,
    /// RAM in use, bytes.
    pub mem: u64,
    /// SoC temperature, °C; `None` when the node cannot measure it.
    pub temp: Option<f32>,
}

/// Sums of the bucket being filled.
#[derive(Debug, Clone, Copy, Default)]
struct Open {
    bucket: i64,
    n: u32,
    cpu: f64,
    mem: f64,
    temp_n: u32,
    temp: f64,
}

impl Open {
    fn close(&self) -> Option<Point> {
        (self.n > 0).then(|| Point {
            t: self.bucket * STEP_SECS,
            cpu: round1(self.cpu / f64::from(self.n)),
            mem: (self.mem / f64::from(self.n)) as u64,
            temp: (self.temp_n > 0).then(|| round1(self.temp / f64::from(self.temp_n))),
        })
    }
}

fn round1(x: f64) -> f32 {
    ((x * 10.0).round() / 10.0) as f32
}

/// One node's series.
#[derive(Debug, Clone)]
pub struct Series {
    points: Ring<Point>,
    open: Open,
}

impl Default for Series {
    fn default() -> Self {
        Series {
            points: Ring::new(POINTS),
            open: Open::default(),
        }
    }
}

impl Series {
    /// Adds one heartbeat received at `now` (Unix seconds). A heartbeat in a later
    /// bucket closes the open one; one from an earlier bucket (a clock step back) is
    /// counted in the open bucket rather than rewriting history.
    pub fn record(&mut self, m: impl Into<Sample>, now: i64) {
        let m = m.into();
        let bucket = now.div_euclid(STEP_SECS);
        if bucket > self.open.bucket {
            if let Some(p) = self.open.close() {
                self.points.push(p);
            }
            self.open = Open {
                bucket,
                ..Open::default()
            };
        }
        self.open.n += 1;
        self.open.cpu += f64::from(m.cpu_percent);
        self.open.mem += m.memory_used_bytes as f64;
        if let Some(t) = m.temperature_celsius {
            self.open.temp_n += 1;
            self.open.temp += f64::from(t);
        }
    }

    /// Closed points, oldest first.
    pub fn points(&self) -> impl Iterator<Item = &Point> {
        self.points.iter()
    }

    /// The newest closed point.
    pub fn last(&self) -> Option<Point> {
        self.points.last().copied()
    }
}

/// Every node's series.
#[derive(Debug, Default)]
pub struct History {
    nodes: Mutex<HashMap<String, Series>>,
    heartbeats: AtomicU64,
}

impl History {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Series>> {
        // Plain numbers: a panic elsewhere leaves nothing worth refusing to serve.
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a heartbeat of `node`, received now.
    pub fn record(&self, node: &str, m: impl Into<Sample>) {
        let now = chrono::Utc::now().timestamp();
        self.record_at(node, m, now);
    }

    /// Adds a heartbeat of `node` received at `now` (Unix seconds).
    pub fn record_at(&self, node: &str, m: impl Into<Sample>, now: i64) {
        let m = m.into();
        let mut nodes = self.lock();
        match nodes.get_mut(node) {
            Some(s) => s.record(m, now),
            None => {
                let mut s = Series::default();
                s.record(m, now);
                nodes.insert(node.to_string(), s);
            }
        }
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
    }

    /// Heartbeats recorded since start: a change means there is news to publish.
    pub fn heartbeats(&self) -> u64 {
        self.heartbeats.load(Ordering::Relaxed)
    }

    /// A copy of one node's closed points, oldest first.
    pub fn points(&self, node: &str) -> Vec<Point> {
        self.lock()
            .get(node)
            .map(|s| s.points().copied().collect())
            .unwrap_or_default()
    }

    /// The newest closed point of one node.
    pub fn last(&self, node: &str) -> Option<Point> {
        self.lock().get(node).and_then(Series::last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(cpu: f32, mem: u64, temp: Option<f32>) -> NodeMetrics {
        NodeMetrics {
            cpu_percent: cpu,
            memory_used_bytes: mem,
            temperature_celsius: temp,
            ..NodeMetrics::default()
        }
    }

    #[test]
    fn ring_keeps_the_newest_items() {
        let mut r = Ring::new(3);
        assert!(r.is_empty());
        for i in 1..=5 {
            r.push(i);
        }
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(r.last(), Some(&5));
        assert_eq!(r.len(), 3);
        let mut one = Ring::new(0);
        one.push('a');
        one.push('b');
        assert_eq!(one.iter().collect::<Vec<_>>(), [&'b'], "capacity 0 means 1");
    }

    #[test]
    fn averages_heartbeats_into_ten_second_points() {
        let mut s = Series::default();
        s.record(&hb(10.0, 100, Some(50.0)), 1000);
        s.record(&hb(20.0, 300, None), 1005);
        assert!(s.last().is_none(), "the open bucket is not a point yet");
        s.record(&hb(90.0, 500, Some(70.0)), 1010);
        assert_eq!(
            s.last(),
            Some(Point {
                t: 1000,
                cpu: 15.0,
                mem: 200,
                temp: Some(50.0)
            })
        );
        // A gap leaves no invented points; a missing temperature stays missing.
        s.record(&hb(0.0, 0, None), 1100);
        assert_eq!(
            s.last(),
            Some(Point {
                t: 1010,
                cpu: 90.0,
                mem: 500,
                temp: Some(70.0)
            })
        );
        s.record(&hb(0.0, 0, None), 1110);
        assert_eq!(s.last().map(|p| (p.t, p.temp)), Some((1100, None)));
        // A clock step back counts in the open bucket.
        s.record(&hb(100.0, 0, None), 900);
        assert_eq!(s.points().count(), 3);
    }

    #[test]
    fn keeps_one_hour_per_node() {
        let h = History::default();
        for i in 0..(POINTS as i64 + 50) {
            h.record_at("pi1", &hb(1.0, 1, None), i * STEP_SECS);
        }
        let pts = h.points("pi1");
        assert_eq!(pts.len(), POINTS);
        assert!(pts.windows(2).all(|w| w[1].t - w[0].t == STEP_SECS));
        assert_eq!(
            pts.last().map(|p| p.t),
            Some((POINTS as i64 + 48) * STEP_SECS)
        );
        assert!(h.points("pi2").is_empty());
        assert_eq!(h.heartbeats(), POINTS as u64 + 50);
    }
}
