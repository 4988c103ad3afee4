//! Disk hygiene: an SD card that fills up stops everything on the node (Docker cannot
//! create containers, logs cannot be written). Container logs are bounded at creation
//! (json-file, 3 × 10 MB: see `crate::runtime`); images are what piles up, one set per
//! deployed version. So when the disk holding Docker's root directory is more than
//! `--image-gc-threshold` percent used, the agent removes every image no container
//! uses (running or stopped), at most every [`GC_INTERVAL`], and logs what it freed.
//! Images labelled [`crate::runtime::KEEP_IMAGE_LABEL`] are kept.
//!
//! The decision ([`prune_due`]) is a pure function of the measured usage, the threshold
//! and the time since the last prune; [`watch`] measures and acts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::runtime::{error_chain, Runtime};

/// The default `--image-gc-threshold`: percent of the disk in use.
pub const DEFAULT_THRESHOLD: u8 = 85;

/// At most one prune this often: a prune walks every image, and a disk filled by
/// something else than images would otherwise be pruned in a loop.
pub const GC_INTERVAL: Duration = Duration::from_secs(600);

/// How often the disk is measured (one `statvfs`: cheap).
pub const CHECK_EVERY: Duration = Duration::from_secs(60);

/// Percent of the file system in use, as `df` computes it: used blocks over the blocks
/// an unprivileged process can use (the root reserve does not count as free).
/// `None` for an empty file system.
pub fn used_percent(blocks: u64, free: u64, available: u64) -> Option<f64> {
    let used = blocks.saturating_sub(free);
    let usable = used.saturating_add(available);
    (usable > 0).then(|| used as f64 * 100.0 / usable as f64)
}

/// Whether to prune now: the disk is more than `threshold` percent used, and the last
/// prune (if any) was at least [`GC_INTERVAL`] ago. A threshold of 100 never prunes.
pub fn prune_due(used: Option<f64>, threshold: u8, since_last: Option<Duration>) -> bool {
    let full = used.is_some_and(|u| u > f64::from(threshold));
    full && since_last.is_none_or(|d| d >= GC_INTERVAL)
}

/// The usage of the file system holding `path`, in percent.
pub fn usage_of(path: &Path) -> std::io::Result<Option<f64>> {
    let s = rustix::fs::statvfs(path)?;
    Ok(used_percent(s.f_blocks, s.f_bfree, s.f_bavail))
}

/// Measures the disk of Docker's root directory every [`CHECK_EVERY`] and prunes
/// unused images when [`prune_due`] says so. Runs until aborted; failures are logged
/// and retried at the next check.
pub async fn watch(runtime: Runtime, threshold: u8) {
    if threshold >= 100 {
        tracing::info!("image garbage collection is off (--image-gc-threshold 100)");
        return;
    }
    let mut root: Option<PathBuf> = None;
    let mut last_prune: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if root.is_none() {
            root = match runtime.engine_info().await {
                Ok(info) => info.root_dir,
                Err(e) => {
                    tracing::debug!(error = %error_chain(&e), "cannot ask Docker for its root directory");
                    None
                }
            };
        }
        let Some(dir) = root.as_deref() else { continue };
        let used = match usage_of(dir) {
            Ok(u) => u,
            Err(e) => {
                // E.g. an agent in a container that does not see Docker's directory.
                tracing::debug!(dir = %dir.display(), error = %e, "cannot measure Docker's disk");
                continue;
            }
        };
        let since = last_prune.map(|t| t.elapsed());
        if !prune_due(used, threshold, since) {
            continue;
        }
        last_prune = Some(tokio::time::Instant::now());
        tracing::warn!(dir = %dir.display(), used_percent = used.unwrap_or_default().round(), threshold, "disk nearly full; removing images no container uses");
        match runtime.prune_images(None).await {
            Ok(p) => {
                let after = usage_of(dir).ok().flatten().unwrap_or_default().round();
                tracing::warn!(images = ?p.images, layers = p.layers, freed_bytes = p.bytes, used_percent = after, "unused images removed");
            }
            Err(e) => tracing::warn!(error = %error_chain(&e), "cannot remove unused images"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_the_root_reserve_as_used_like_df() {
        assert_eq!(used_percent(100, 100, 95), Some(0.0));
        assert_eq!(used_percent(100, 20, 15), Some(80.0 * 100.0 / 95.0));
        assert_eq!(used_percent(100, 0, 0), Some(100.0));
        assert_eq!(used_percent(0, 0, 0), None);
    }

    #[test]
    fn prunes_only_above_the_threshold_and_at_most_every_ten_minutes() {
        let min = |m: u64| Some(Duration::from_secs(m * 60));
        let cases = [
            (Some(85.0), 85, None, false),
            (Some(85.1), 85, None, true),
            (Some(99.0), 85, min(9), false),
            (Some(99.0), 85, min(10), true),
            (Some(50.0), 85, min(60), false),
            (None, 85, None, false),
            (Some(100.0), 100, None, false),
            (Some(10.0), 5, None, true),
        ];
        for (used, threshold, since, want) in cases {
            assert_eq!(
                prune_due(used, threshold, since),
                want,
                "{used:?} {threshold} {since:?}"
            );
        }
    }

    #[test]
    fn measures_a_real_file_system() {
        let u = usage_of(Path::new("/")).expect("statvfs /");
        assert!(u.is_some_and(|u| (0.0..=100.0).contains(&u)), "{u:?}");
        assert!(usage_of(Path::new("/no/such/dir")).is_err());
    }
}
