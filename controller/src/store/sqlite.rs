//! The embedded [`Store`]: one SQLite file in WAL mode, for one controller.
//!
//! Schema (`user_version` 2):
//! - `kv(key TEXT PRIMARY KEY, value BLOB, create_revision, mod_revision, lease)`,
//!   keys compared byte for byte (SQLite's BINARY collation is `memcmp`), so `list` is
//!   sorted as etcd sorts and a prefix scan is an index range.
//! - `meta(name, value)` holding `revision` (its own row, so it never goes back even
//!   when every key is deleted) and `lease_seq` (lease ids are never reused).
//! - `lease(id, ttl_secs)`: granted leases. Their deadlines live in memory: a store that
//!   is opened again gives every lease a full TTL from the opening, as etcd's new leader
//!   does, so a lease is never shorter than granted.
//!
//! One connection behind a mutex: the controller is one process, its transactions are
//! short, and a single writer is what SQLite does best. Calls run on tokio's blocking
//! pool. Watches are served from memory: every commit hands its changes to the
//! watchers under the same lock that orders commits, and the newest changes are kept
//! ([`HISTORY_BATCHES`]) so a watcher can start a little in the past. Another process
//! writing the same file is not seen by watches: this backend is for one controller.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior};
use tokio::sync::mpsc;

use super::{
    check_ops, lease_seconds, prefix_end, Error, EventKind, KeyValue, Lease, LeaseId, Listing, Op,
    Result, Store, Txn, TxnResult, Watch, WatchBatch, WatchEvent,
};

/// The newest schema this release writes and reads.
const SCHEMA_VERSION: i64 = 2;

/// How long a statement waits for another process's lock (a `sqlite3` shell, a backup)
/// before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Revisions of changes kept for watches that start in the past.
pub const HISTORY_BATCHES: usize = 256;

/// Bytes of values kept in that history at most (a Pi's memory is precious).
const HISTORY_BYTES: usize = 1 << 20;

/// Batches queued per watcher; a watcher further behind is cut off
/// ([`Error::WatchLagged`]) and lists again.
const WATCH_QUEUE: usize = 1024;

const SCHEMA: &str = "
CREATE TABLE kv (
    key TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    lease INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE meta (
    name TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE lease (
    id INTEGER PRIMARY KEY NOT NULL,
    ttl_secs INTEGER NOT NULL
);
INSERT INTO meta (name, value) VALUES ('revision', 0);
INSERT INTO meta (name, value) VALUES ('lease_seq', 0);
";

/// From schema 1 (no leases) to 2.
const MIGRATE_1_TO_2: &str = "
ALTER TABLE kv ADD COLUMN lease INTEGER NOT NULL DEFAULT 0;
CREATE TABLE lease (
    id INTEGER PRIMARY KEY NOT NULL,
    ttl_secs INTEGER NOT NULL
);
INSERT INTO meta (name, value) VALUES ('lease_seq', 0);
";

const SELECT_KV: &str = "SELECT key, value, create_revision, mod_revision, lease FROM kv";

/// The SQLite backend of [`Store`].
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Mutex<Db>,
    /// Wakes the lease sweeper when a deadline moves earlier or the store closes.
    sweep: Condvar,
    sweeper_started: AtomicBool,
    closing: AtomicBool,
    /// For messages; `:memory:` for an in-memory store.
    path: PathBuf,
    writes: AtomicU64,
}

struct Db {
    conn: Connection,
    hub: Hub,
    /// Lease id → (TTL, deadline).
    leases: HashMap<LeaseId, (Duration, Instant)>,
}

/// The watchers and the recent changes.
#[derive(Default)]
struct Hub {
    history: VecDeque<WatchBatch>,
    history_bytes: usize,
    /// Every revision from this one on is in `history` (if it changed anything).
    covered_from: u64,
    watchers: Vec<Watcher>,
}

struct Watcher {
    prefix: String,
    tx: mpsc::Sender<Result<WatchBatch>>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("writes", &self.write_count())
            .finish_non_exhaustive()
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // The sweeper holds the store alive while it waits; tell it to go.
        self.inner.closing.store(true, Ordering::Relaxed);
        self.inner.sweep.notify_all();
    }
}

fn boxed(
    e: impl std::error::Error + Send + Sync + 'static,
) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

impl SqliteStore {
    /// Opens (or creates) the store at `path`, creating or migrating its schema.
    ///
    /// WAL with `synchronous=NORMAL`: a commit is one append to the WAL and no fsync of
    /// the database, which spares the SD card; a power cut may lose the last commits but
    /// never corrupts the file, and the level-triggered loops redo lost work.
    ///
    /// The file is its owner's only (0600): it holds the cluster's secrets, sealed, and
    /// its WAL and shared-memory files take the database file's mode.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let open_err = |source: rusqlite::Error| Error::Open {
            location: path.display().to_string(),
            source: boxed(source),
        };
        private_files(path).map_err(|e| Error::Open {
            location: path.display().to_string(),
            source: boxed(e),
        })?;
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // The first statement that reads the file: a file that is not a database (or is
        // damaged in its header) fails here, as an error naming it.
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            // Some file systems cannot do WAL (no shared memory); the store still works,
            // only with more writes per commit.
            tracing::warn!(path = %path.display(), mode = %mode, "store is not in WAL mode");
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        Self::setup(conn, path.to_path_buf())
    }

    /// A fresh store in memory, for tests.
    pub fn open_in_memory() -> Result<SqliteStore> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory().map_err(|source| Error::Open {
            location: path.display().to_string(),
            source: boxed(source),
        })?;
        Self::setup(conn, path)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn setup(mut conn: Connection, path: PathBuf) -> Result<SqliteStore> {
        migrate(&mut conn, &path)?;
        let inner = Inner {
            db: Mutex::new(Db {
                conn,
                hub: Hub::default(),
                leases: HashMap::new(),
            }),
            sweep: Condvar::new(),
            sweeper_started: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            path,
            writes: AtomicU64::new(0),
        };
        let store = SqliteStore {
            inner: Arc::new(inner),
        };
        let any_lease = {
            let mut db = store.inner.lock();
            let revision = store.inner.read_revision(&db.conn)?;
            db.hub.covered_from = revision + 1;
            let now = Instant::now();
            for (id, secs) in store.inner.stored_leases(&db.conn)? {
                let ttl = Duration::from_secs(secs);
                db.leases.insert(id, (ttl, now + ttl));
            }
            !db.leases.is_empty()
        };
        if any_lease {
            store.inner.start_sweeper();
        }
        Ok(store)
    }

    /// Runs `f` on the blocking pool (or here, outside a runtime) with the store.
    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Arc<Inner>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = Arc::clone(&self.inner);
        match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::spawn_blocking(move || f(&inner))
                .await
                .map_err(|e| Error::Backend {
                    location: self.location(),
                    op,
                    source: boxed(e),
                })?,
            Err(_) => f(&inner),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Db> {
        // A panic while the lock was held cannot have left half a transaction behind:
        // rusqlite's Transaction rolls back when dropped, also while unwinding. So the
        // connection is still consistent and usable.
        self.db.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn err(&self, op: &'static str) -> impl Fn(rusqlite::Error) -> Error + '_ {
        move |source| Error::Backend {
            location: self.location(),
            op,
            source: boxed(source),
        }
    }

    fn corrupt(&self, key: &str, reason: String) -> Error {
        Error::Corrupt {
            location: self.location(),
            key: key.to_string(),
            reason,
        }
    }

    /// Decodes one `kv` row, checking what the schema cannot: revisions are positive.
    fn row(&self, row: &Row<'_>) -> Result<KeyValue> {
        let key: String = row
            .get(0)
            .map_err(|e| self.corrupt("?", format!("key: {e}")))?;
        let value: Vec<u8> = row
            .get(1)
            .map_err(|e| self.corrupt(&key, format!("value: {e}")))?;
        let create_revision = self.revision_column(row, 2, &key, "create_revision")?;
        let mod_revision = self.revision_column(row, 3, &key, "mod_revision")?;
        let lease: i64 = row
            .get(4)
            .map_err(|e| self.corrupt(&key, format!("lease: {e}")))?;
        Ok(KeyValue {
            key,
            value,
            create_revision,
            mod_revision,
            lease,
        })
    }

    fn revision_column(&self, row: &Row<'_>, idx: usize, key: &str, name: &str) -> Result<u64> {
        let raw: i64 = row
            .get(idx)
            .map_err(|e| self.corrupt(key, format!("{name}: {e}")))?;
        // Revision 0 means "absent" to Compare, so a stored row can never have it.
        u64::try_from(raw)
            .ok()
            .filter(|r| *r > 0)
            .ok_or_else(|| self.corrupt(key, format!("{name} is {raw}, not a positive revision")))
    }

    fn meta(&self, conn: &Connection, name: &str) -> Result<u64> {
        let raw: Option<i64> = conn
            .prepare_cached("SELECT value FROM meta WHERE name = ?1")
            .and_then(|mut s| s.query_row([name], |r| r.get(0)).optional())
            .map_err(self.err("read"))?;
        let raw = raw.ok_or_else(|| self.corrupt(name, "missing from meta".to_string()))?;
        u64::try_from(raw).map_err(|_| self.corrupt(name, format!("{raw} is negative")))
    }

    fn read_revision(&self, conn: &Connection) -> Result<u64> {
        self.meta(conn, "revision")
    }

    fn stored_leases(&self, conn: &Connection) -> Result<Vec<(LeaseId, u64)>> {
        let mut stmt = conn
            .prepare_cached("SELECT id, ttl_secs FROM lease")
            .map_err(self.err("read"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
            .map_err(self.err("read"))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, secs) = row.map_err(self.err("read"))?;
            let secs = u64::try_from(secs)
                .ok()
                .filter(|s| *s > 0)
                .ok_or_else(|| self.corrupt(&format!("lease {id:x}"), format!("ttl {secs}")))?;
            out.push((id, secs));
        }
        Ok(out)
    }

    fn get_kv(&self, conn: &Connection, key: &str) -> Result<Option<KeyValue>> {
        let mut stmt = conn
            .prepare_cached(&format!("{SELECT_KV} WHERE key = ?1"))
            .map_err(self.err("read"))?;
        let mut rows = stmt.query([key]).map_err(self.err("read"))?;
        match rows.next().map_err(self.err("read"))? {
            Some(row) => Ok(Some(self.row(row)?)),
            None => Ok(None),
        }
    }

    fn list_kvs(&self, conn: &Connection, prefix: &str) -> Result<Vec<KeyValue>> {
        let end = prefix_end(prefix);
        let sql = match end {
            Some(_) => format!("{SELECT_KV} WHERE key >= ?1 AND key < ?2 ORDER BY key"),
            None => format!("{SELECT_KV} WHERE key >= ?1 ORDER BY key"),
        };
        let mut stmt = conn.prepare_cached(&sql).map_err(self.err("read"))?;
        let mut rows = match &end {
            Some(end) => stmt.query([prefix, end.as_str()]),
            None => stmt.query([prefix]),
        }
        .map_err(self.err("read"))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(self.err("read"))? {
            out.push(self.row(row)?);
        }
        Ok(out)
    }

    /// Deletes the keys of `ops`'s deletes (or of a lease) and returns them, for the
    /// watchers.
    fn delete_returning(
        &self,
        conn: &Connection,
        sql: &str,
        params: &[&str],
    ) -> Result<Vec<String>> {
        let mut stmt = conn.prepare_cached(sql).map_err(self.err("write"))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(params.iter()), |r| {
                r.get::<_, String>(0)
            })
            .map_err(self.err("write"))?;
        let mut keys = Vec::new();
        for k in rows {
            keys.push(k.map_err(self.err("write"))?);
        }
        Ok(keys)
    }

    /// Applies one op at `rev`; returns the changes it made.
    fn apply(&self, conn: &Connection, op: &Op, rev: u64, rev_sql: i64) -> Result<Vec<WatchEvent>> {
        let deleted = |keys: Vec<String>| {
            keys.into_iter()
                .map(|key| WatchEvent {
                    kind: EventKind::Delete,
                    kv: KeyValue {
                        key,
                        value: Vec::new(),
                        create_revision: 0,
                        mod_revision: rev,
                        lease: 0,
                    },
                })
                .collect::<Vec<_>>()
        };
        match op {
            Op::Put { key, value, lease } => {
                // The upsert keeps create_revision on an existing key, as etcd does.
                let create: i64 = conn
                    .prepare_cached(
                        "INSERT INTO kv (key, value, create_revision, mod_revision, lease) VALUES (?1, ?2, ?3, ?3, ?4)
                         ON CONFLICT(key) DO UPDATE SET value = excluded.value, mod_revision = excluded.mod_revision, lease = excluded.lease
                         RETURNING create_revision",
                    )
                    .and_then(|mut s| {
                        s.query_row(rusqlite::params![key, value, rev_sql, lease], |r| r.get(0))
                    })
                    .map_err(self.err("write"))?;
                Ok(vec![WatchEvent {
                    kind: EventKind::Put,
                    kv: KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: u64::try_from(create).unwrap_or(rev),
                        mod_revision: rev,
                        lease: *lease,
                    },
                }])
            }
            Op::Delete { key } => Ok(deleted(self.delete_returning(
                conn,
                "DELETE FROM kv WHERE key = ?1 RETURNING key",
                &[key],
            )?)),
            Op::DeletePrefix { prefix } => {
                let keys = match prefix_end(prefix) {
                    Some(end) => self.delete_returning(
                        conn,
                        "DELETE FROM kv WHERE key >= ?1 AND key < ?2 RETURNING key",
                        &[prefix, &end],
                    )?,
                    None => self.delete_returning(
                        conn,
                        "DELETE FROM kv WHERE key >= ?1 RETURNING key",
                        &[prefix],
                    )?,
                };
                Ok(deleted(keys))
            }
        }
    }

    /// Whether `lease` exists and has not ended by `now`.
    fn lease_alive(db: &Db, lease: LeaseId, now: Instant) -> bool {
        db.leases.get(&lease).is_some_and(|(_, d)| *d > now)
    }

    fn txn(&self, txn: &Txn) -> Result<TxnResult> {
        check_ops(&txn.ops)?;
        let mut db = self.lock();
        // A lease past its deadline is gone, whether or not the sweeper got to it.
        self.expire_due(&mut db, Instant::now())?;
        let now = Instant::now();
        let Db { conn, hub, leases } = &mut *db;
        // IMMEDIATE takes the write lock now, so nobody (say a `sqlite3` shell) can write
        // between our compares and our ops.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.err("begin transaction"))?;
        let current = self.read_revision(&tx)?;
        for cmp in &txn.compares {
            let kv = self.get_kv(&tx, cmp.key())?;
            if !cmp.holds(kv.as_ref()) {
                // Dropping `tx` rolls back; nothing was written.
                return Ok(TxnResult {
                    succeeded: false,
                    revision: current,
                });
            }
        }
        for op in &txn.ops {
            if let Op::Put { lease, .. } = op {
                if *lease != 0 && leases.get(lease).is_none_or(|(_, d)| *d <= now) {
                    return Err(Error::LeaseNotFound(*lease));
                }
            }
        }
        let next = current + 1;
        // SQLite integers are i64; 2^63 revisions is beyond any SD card's life.
        let next_sql = i64::try_from(next)
            .map_err(|_| self.corrupt("revision", format!("{current} cannot grow")))?;
        let mut events = Vec::new();
        for op in &txn.ops {
            events.extend(self.apply(&tx, op, next, next_sql)?);
        }
        if events.is_empty() {
            // Nothing changed (no ops, or deletes of absent keys): no revision, no write.
            return Ok(TxnResult {
                succeeded: true,
                revision: current,
            });
        }
        tx.prepare_cached("UPDATE meta SET value = ?1 WHERE name = 'revision'")
            .and_then(|mut s| s.execute([next_sql]))
            .map_err(self.err("write"))?;
        tx.commit().map_err(self.err("commit"))?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        hub.publish(WatchBatch {
            revision: next,
            events,
        });
        Ok(TxnResult {
            succeeded: true,
            revision: next,
        })
    }

    /// Ends `ids`: deletes their keys at one new revision (if they had any) and their
    /// rows, and tells the watchers.
    fn end_leases(&self, db: &mut Db, ids: &[LeaseId]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let Db { conn, hub, leases } = db;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.err("begin transaction"))?;
        let current = self.read_revision(&tx)?;
        let next = current + 1;
        let next_sql = i64::try_from(next)
            .map_err(|_| self.corrupt("revision", format!("{current} cannot grow")))?;
        let mut events = Vec::new();
        for id in ids {
            let keys: Vec<String> = {
                let mut stmt = tx
                    .prepare_cached("SELECT key FROM kv WHERE lease = ?1 ORDER BY key")
                    .map_err(self.err("read"))?;
                let rows = stmt
                    .query_map([id], |r| r.get::<_, String>(0))
                    .map_err(self.err("read"))?;
                rows.collect::<rusqlite::Result<_>>()
                    .map_err(self.err("read"))?
            };
            for key in keys {
                events.extend(self.apply(&tx, &Op::Delete { key }, next, next_sql)?);
            }
            tx.prepare_cached("DELETE FROM lease WHERE id = ?1")
                .and_then(|mut s| s.execute([id]))
                .map_err(self.err("write"))?;
        }
        if !events.is_empty() {
            tx.prepare_cached("UPDATE meta SET value = ?1 WHERE name = 'revision'")
                .and_then(|mut s| s.execute([next_sql]))
                .map_err(self.err("write"))?;
        }
        tx.commit().map_err(self.err("commit"))?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        for id in ids {
            leases.remove(id);
        }
        if !events.is_empty() {
            hub.publish(WatchBatch {
                revision: next,
                events,
            });
        }
        Ok(())
    }

    /// Ends every lease whose deadline has passed at `now`.
    fn expire_due(&self, db: &mut Db, now: Instant) -> Result<()> {
        let due: Vec<LeaseId> = db
            .leases
            .iter()
            .filter(|(_, (_, d))| *d <= now)
            .map(|(id, _)| *id)
            .collect();
        if !due.is_empty() {
            tracing::debug!(leases = due.len(), "leases expired");
        }
        self.end_leases(db, &due)
    }

    fn grant(&self, ttl: Duration) -> Result<Lease> {
        let secs = lease_seconds(ttl);
        let secs_sql = i64::try_from(secs)
            .map_err(|_| Error::InvalidTxn(format!("lease TTL of {secs} s is too long")))?;
        let mut db = self.lock();
        let tx = db
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.err("begin transaction"))?;
        let id = self.meta(&tx, "lease_seq")? + 1;
        let id_sql = i64::try_from(id)
            .map_err(|_| self.corrupt("lease_seq", format!("{id} cannot grow")))?;
        tx.prepare_cached("UPDATE meta SET value = ?1 WHERE name = 'lease_seq'")
            .and_then(|mut s| s.execute([id_sql]))
            .map_err(self.err("write"))?;
        tx.prepare_cached("INSERT INTO lease (id, ttl_secs) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute([id_sql, secs_sql]))
            .map_err(self.err("write"))?;
        tx.commit().map_err(self.err("commit"))?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        let ttl = Duration::from_secs(secs);
        db.leases.insert(id_sql, (ttl, Instant::now() + ttl));
        drop(db);
        self.sweep.notify_all();
        Ok(Lease { id: id_sql, ttl })
    }

    fn keep_alive(&self, id: LeaseId) -> Result<Duration> {
        let mut db = self.lock();
        let now = Instant::now();
        self.expire_due(&mut db, now)?;
        if !Self::lease_alive(&db, id, now) {
            return Err(Error::LeaseNotFound(id));
        }
        let entry = db.leases.get_mut(&id).ok_or(Error::LeaseNotFound(id))?;
        entry.1 = now + entry.0;
        // Memory only: a keep-alive is no write, so leases cost the SD card nothing.
        Ok(entry.0)
    }

    fn revoke(&self, id: LeaseId) -> Result<()> {
        let mut db = self.lock();
        self.expire_due(&mut db, Instant::now())?;
        if !db.leases.contains_key(&id) {
            return Err(Error::LeaseNotFound(id));
        }
        self.end_leases(&mut db, &[id])
    }

    /// Starts the thread that ends leases at their deadlines (once).
    fn start_sweeper(self: &Arc<Self>) {
        if self.sweeper_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let inner = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("store-leases".into())
            .spawn(move || inner.sweep_leases());
        if let Err(e) = spawned {
            // Leases still end: every operation expires the due ones first.
            tracing::warn!(error = %e, "cannot start the lease sweeper");
            self.sweeper_started.store(false, Ordering::Relaxed);
        }
    }

    fn sweep_leases(&self) {
        let mut db = self.lock();
        loop {
            if self.closing.load(Ordering::Relaxed) {
                return;
            }
            let now = Instant::now();
            if let Err(e) = self.expire_due(&mut db, now) {
                tracing::warn!(error = %e, "could not end expired leases; retrying");
            }
            let wait = db
                .leases
                .values()
                .map(|(_, d)| d.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::from_secs(1))
                .clamp(Duration::from_millis(10), Duration::from_secs(1));
            db = self
                .sweep
                .wait_timeout(db, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

impl Hub {
    /// Remembers a batch and hands it to every watcher of a prefix it touches; a watcher
    /// whose queue is full is cut off.
    fn publish(&mut self, batch: WatchBatch) {
        self.watchers.retain(|w| {
            let events: Vec<WatchEvent> = batch
                .events
                .iter()
                .filter(|e| e.kv.key.starts_with(&w.prefix))
                .cloned()
                .collect();
            if events.is_empty() {
                return !w.tx.is_closed();
            }
            match w.tx.try_send(Ok(WatchBatch {
                revision: batch.revision,
                events,
            })) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(prefix = %w.prefix, "store watcher too slow; cutting it off");
                    false
                }
            }
        });
        self.history_bytes += batch_bytes(&batch);
        self.history.push_back(batch);
        while self.history.len() > HISTORY_BATCHES || self.history_bytes > HISTORY_BYTES {
            let Some(old) = self.history.pop_front() else {
                break;
            };
            self.history_bytes -= batch_bytes(&old);
            self.covered_from = old.revision + 1;
        }
    }
}

fn batch_bytes(b: &WatchBatch) -> usize {
    b.events
        .iter()
        .map(|e| e.kv.key.len() + e.kv.value.len() + 48)
        .sum()
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, u64)> {
        let key = key.to_string();
        self.blocking("read", move |inner| {
            let mut db = inner.lock();
            inner.expire_due(&mut db, Instant::now())?;
            let kv = inner.get_kv(&db.conn, &key)?;
            Ok((kv, inner.read_revision(&db.conn)?))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Listing> {
        let prefix = prefix.to_string();
        self.blocking("read", move |inner| {
            let mut db = inner.lock();
            inner.expire_due(&mut db, Instant::now())?;
            Ok(Listing {
                kvs: inner.list_kvs(&db.conn, &prefix)?,
                revision: inner.read_revision(&db.conn)?,
            })
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        self.blocking("write", move |inner| inner.txn(&txn)).await
    }

    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<Watch> {
        let mut db = self.inner.lock();
        let current = self.inner.read_revision(&db.conn)?;
        let start = if from_revision == 0 {
            current + 1
        } else {
            from_revision
        };
        if start < db.hub.covered_from {
            return Err(Error::Compacted {
                requested: start,
                oldest: db.hub.covered_from,
            });
        }
        let backlog: Vec<Result<WatchBatch>> = db
            .hub
            .history
            .iter()
            .filter(|b| b.revision >= start)
            .filter_map(|b| {
                let events: Vec<WatchEvent> = b
                    .events
                    .iter()
                    .filter(|e| e.kv.key.starts_with(prefix))
                    .cloned()
                    .collect();
                (!events.is_empty()).then_some(Ok(WatchBatch {
                    revision: b.revision,
                    events,
                }))
            })
            .collect();
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        db.hub.watchers.push(Watcher {
            prefix: prefix.to_string(),
            tx,
        });
        drop(db);
        // A watcher cut off for being slow sees its queue end while the store lives:
        // the stream then ends with WatchLagged, so the caller lists again.
        let inner = Some(Arc::downgrade(&self.inner));
        let live = futures_util::stream::unfold((rx, inner), |(mut rx, inner)| async move {
            match rx.recv().await {
                Some(item) => Some((item, (rx, inner))),
                None => {
                    let open = inner
                        .and_then(|w| w.upgrade())
                        .is_some_and(|i| !i.closing.load(Ordering::Relaxed));
                    open.then(|| (Err(Error::WatchLagged), (rx, None)))
                }
            }
        });
        Ok(Box::pin(futures_util::stream::iter(backlog).chain(live)))
    }

    async fn grant(&self, ttl: Duration) -> Result<Lease> {
        let lease = self
            .blocking("grant", move |inner| inner.grant(ttl))
            .await?;
        self.inner.start_sweeper();
        Ok(lease)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        self.blocking("keep alive", move |inner| inner.keep_alive(lease))
            .await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.blocking("revoke", move |inner| inner.revoke(lease))
            .await
    }

    async fn revision(&self) -> Result<u64> {
        self.blocking("read", |inner| {
            let db = inner.lock();
            inner.read_revision(&db.conn)
        })
        .await
    }

    fn write_count(&self) -> u64 {
        self.inner.writes.load(Ordering::Relaxed)
    }

    fn location(&self) -> String {
        self.inner.location()
    }
}

/// Creates the database file readable by its owner only, and tightens it and its WAL
/// and shared-memory files if they exist (SQLite gives those the database's mode).
fn private_files(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if !path.exists() {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let p = PathBuf::from(p);
        if let Ok(meta) = std::fs::metadata(&p) {
            if meta.permissions().mode() & 0o777 != 0o600 {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
            }
        }
    }
    Ok(())
}

/// Creates the schema in a new file, checks or migrates it in an existing one. Runs in
/// one IMMEDIATE transaction so two processes opening a new file at once cannot both
/// create it.
fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let location = path.display().to_string();
    let open_err = |source: rusqlite::Error| Error::Open {
        location: location.clone(),
        source: boxed(source),
    };
    let foreign = || Error::Foreign {
        location: location.clone(),
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(open_err)?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(open_err)?;
    let count_tables = |names: &str| -> Result<i64> {
        let sql = if names.is_empty() {
            "SELECT count(*) FROM sqlite_master".to_string()
        } else {
            format!("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ({names})")
        };
        tx.query_row(&sql, [], |row| row.get(0)).map_err(open_err)
    };
    match version {
        0 => {
            // A database with user_version 0 but with tables is someone else's file.
            if count_tables("")? != 0 {
                return Err(foreign());
            }
            tx.execute_batch(SCHEMA).map_err(open_err)?;
        }
        1 => {
            if count_tables("'kv', 'meta'")? != 2 {
                return Err(foreign());
            }
            tracing::info!(path = %path.display(), "migrating the store from schema 1 to 2 (leases)");
            tx.execute_batch(MIGRATE_1_TO_2).map_err(open_err)?;
        }
        SCHEMA_VERSION => {
            if count_tables("'kv', 'meta', 'lease'")? != 3 {
                return Err(foreign());
            }
        }
        found if found > SCHEMA_VERSION => {
            return Err(Error::SchemaTooNew {
                location: location.clone(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        _ => return Err(foreign()),
    }
    if version != SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(open_err)?;
    }
    tx.commit().map_err(open_err)
}

#[cfg(test)]
mod tests {
    //! What only this backend has: files, schemas, corruption, processes sharing a file.
    //! The behaviour every backend shares is checked by the conformance suite
    //! (`controller/tests/store.rs`).

    use std::collections::BTreeMap;
    use std::sync::Barrier;

    use super::*;
    use crate::store::Compare;

    fn put(key: &str, value: &str) -> Op {
        Op::put(key, value.as_bytes().to_vec())
    }

    fn rev(key: &str, rev: u64) -> Compare {
        Compare::ModRevision {
            key: key.to_string(),
            rev,
        }
    }

    fn txn(s: &SqliteStore, compares: Vec<Compare>, ops: Vec<Op>) -> TxnResult {
        s.inner.txn(&Txn { compares, ops }).expect("txn")
    }

    fn keys(s: &SqliteStore, prefix: &str) -> Vec<String> {
        let db = s.inner.lock();
        s.inner
            .list_kvs(&db.conn, prefix)
            .expect("list")
            .into_iter()
            .map(|kv| kv.key)
            .collect()
    }

    fn get(s: &SqliteStore, key: &str) -> Option<KeyValue> {
        let db = s.inner.lock();
        s.inner.get_kv(&db.conn, key).expect("get")
    }

    #[test]
    fn revisions_stay_monotonic_across_reopen_even_when_everything_is_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.db");
        {
            let s = SqliteStore::open(&path).expect("open");
            txn(&s, vec![], vec![put("/a", "1")]);
            txn(&s, vec![], vec![put("/b", "1")]);
            txn(&s, vec![], vec![Op::DeletePrefix { prefix: "/".into() }]);
        }
        let s = SqliteStore::open(&path).expect("reopen");
        assert_eq!(s.inner.read_revision(&s.inner.lock().conn).expect("rev"), 3);
        let r = txn(&s, vec![], vec![put("/a", "2")]);
        assert_eq!(r.revision, 4);
        assert_eq!(get(&s, "/a").expect("present").create_revision, 4);
        assert_eq!(s.write_count(), 1, "reopening writes nothing");
    }

    #[test]
    fn leases_outlive_a_reopen_with_a_full_ttl() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.db");
        let id = {
            let s = SqliteStore::open(&path).expect("open");
            let lease = s.inner.grant(Duration::from_secs(30)).expect("grant");
            s.inner
                .txn(&Txn {
                    compares: vec![],
                    ops: vec![Op::Put {
                        key: "/owner".into(),
                        value: b"n1".to_vec(),
                        lease: lease.id,
                    }],
                })
                .expect("put with lease");
            lease.id
        };
        let s = SqliteStore::open(&path).expect("reopen");
        assert_eq!(get(&s, "/owner").expect("kept").lease, id);
        assert_eq!(
            s.inner.keep_alive(id).expect("alive"),
            Duration::from_secs(30)
        );
        s.inner.revoke(id).expect("revoke");
        assert!(get(&s, "/owner").is_none());
        // Ids are never reused, so a stale holder cannot keep a new lease alive.
        let next = s.inner.grant(Duration::from_secs(1)).expect("grant");
        assert!(next.id > id);
    }

    #[test]
    fn migrates_a_schema_1_store_and_keeps_its_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("old.db");
        {
            let c = Connection::open(&path).expect("create");
            c.execute_batch(
                "CREATE TABLE kv (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL,
                    create_revision INTEGER NOT NULL, mod_revision INTEGER NOT NULL) WITHOUT ROWID;
                 CREATE TABLE meta (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL) WITHOUT ROWID;
                 INSERT INTO meta VALUES ('revision', 7);
                 INSERT INTO kv VALUES ('/nodes/pi1', x'7b7d', 2, 7);
                 PRAGMA user_version = 1;",
            )
            .expect("schema 1");
        }
        let s = SqliteStore::open(&path).expect("migrates");
        let kv = get(&s, "/nodes/pi1").expect("kept");
        assert_eq!((kv.create_revision, kv.mod_revision, kv.lease), (2, 7, 0));
        assert_eq!(txn(&s, vec![], vec![put("/x", "1")]).revision, 8);
        drop(s);
        // Opened again, it is a schema-2 store and stays so.
        SqliteStore::open(&path).expect("reopens");
    }

    #[test]
    fn a_file_that_is_not_a_database_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("garbage.db");
        std::fs::write(&path, vec![0x5a; 8192]).expect("write");
        let err = SqliteStore::open(&path).expect_err("garbage");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");

        let missing = dir.path().join("no/such/dir/store.db");
        let err = SqliteStore::open(&missing).expect_err("missing dir");
        assert!(
            err.to_string().contains(&*missing.to_string_lossy()),
            "{err}"
        );
    }

    #[test]
    fn refuses_foreign_and_newer_databases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let foreign = dir.path().join("foreign.db");
        Connection::open(&foreign)
            .and_then(|c| c.execute_batch("CREATE TABLE users (id INTEGER)"))
            .expect("foreign db");
        assert!(matches!(
            SqliteStore::open(&foreign),
            Err(Error::Foreign { .. })
        ));

        let newer = dir.path().join("newer.db");
        drop(SqliteStore::open(&newer).expect("open"));
        Connection::open(&newer)
            .and_then(|c| c.pragma_update(None, "user_version", 9))
            .expect("bump version");
        let err = SqliteStore::open(&newer).expect_err("newer");
        assert!(
            matches!(
                err,
                Error::SchemaTooNew {
                    found: 9,
                    supported: 2,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_row_is_an_error_naming_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.db");
        drop(SqliteStore::open(&path).expect("open"));
        Connection::open(&path)
            .and_then(|c| {
                c.execute_batch(
                    "INSERT INTO kv VALUES ('/neg', x'00', -1, -1, 0);
                     INSERT INTO kv VALUES ('/text', 'a string, not a blob', 1, 1, 0);",
                )
            })
            .expect("tamper");
        let s = SqliteStore::open(&path).expect("reopen");
        let db = s.inner.lock();
        for key in ["/neg", "/text"] {
            let err = s.inner.get_kv(&db.conn, key).expect_err("corrupt row");
            assert!(
                matches!(&err, Error::Corrupt { key: k, .. } if k == key),
                "{err}"
            );
        }
        assert!(s.inner.list_kvs(&db.conn, "/").is_err());
        drop(db);
        // A compare against a corrupt row is an error, not a guess.
        assert!(s
            .inner
            .txn(&Txn {
                compares: vec![rev("/neg", 0)],
                ops: vec![put("/x", "1")]
            })
            .is_err());
        assert_eq!(s.write_count(), 0);
    }

    #[test]
    fn concurrent_compare_and_swap_has_exactly_one_winner_per_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.db");
        // Two stores on one file stand for two processes: they race through SQLite's
        // file locks, not only through one mutex.
        let stores = [
            Arc::new(SqliteStore::open(&path).expect("open")),
            Arc::new(SqliteStore::open(&path).expect("open again")),
        ];
        const THREADS: usize = 8;
        const KEYS: usize = 20;
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let s = Arc::clone(&stores[t % 2]);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut won = Vec::new();
                    for k in 0..KEYS {
                        let key = format!("/locks/{k}");
                        // Each thread creates the key if absent, then bumps it from the
                        // revision it read: both races must have one winner.
                        if txn(&s, vec![rev(&key, 0)], vec![put(&key, &t.to_string())]).succeeded {
                            won.push((k, "create"));
                        }
                        let r = get(&s, &key).expect("present").mod_revision;
                        if txn(&s, vec![rev(&key, r)], vec![put(&key, &t.to_string())]).succeeded {
                            won.push((k, "update"));
                        }
                    }
                    won
                })
            })
            .collect();
        let mut winners: BTreeMap<(usize, &str), usize> = BTreeMap::new();
        for h in handles {
            for w in h.join().expect("thread") {
                *winners.entry(w).or_default() += 1;
            }
        }
        for k in 0..KEYS {
            assert_eq!(
                winners.get(&(k, "create")),
                Some(&1),
                "key {k}: one creator"
            );
            assert!(
                winners.get(&(k, "update")).is_some_and(|n| *n >= 1),
                "key {k}"
            );
        }
        // Every success was one write and one revision, no more, no less.
        let successes: usize = winners.values().sum();
        let writes: u64 = stores.iter().map(|s| s.write_count()).sum();
        assert_eq!(writes, successes as u64);
        let revision = {
            let db = stores[0].inner.lock();
            stores[0].inner.read_revision(&db.conn).expect("revision")
        };
        assert_eq!(revision, successes as u64);
        assert_eq!(keys(&stores[0], "/locks/").len(), KEYS);
    }
}
