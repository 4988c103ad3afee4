//! The embedded [`Store`]: one SQLite file in WAL mode.
//!
//! Schema (`user_version` 1):
//! - `kv(key TEXT PRIMARY KEY, value BLOB, create_revision, mod_revision)`, keys compared
//!   byte for byte (SQLite's BINARY collation is `memcmp`), so `list` is sorted as etcd
//!   sorts and a prefix scan is an index range.
//! - `meta(name, value)` holding `revision`: the counter lives in its own row so it never
//!   goes back, even when every key is deleted.
//!
//! One connection behind a mutex: the controller is one process, its transactions are
//! short, and a single writer is what SQLite does best. Reads go through the same
//! connection, so a read never sees a half-applied transaction.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior};

use super::{check_ops, prefix_end, Compare, Error, KeyValue, Op, Result, Store, TxnResult};

/// The newest schema this release writes and reads.
const SCHEMA_VERSION: i64 = 1;

/// How long a statement waits for another process's lock (a `sqlite3` shell, a backup)
/// before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE kv (
    key TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE meta (
    name TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO meta (name, value) VALUES ('revision', 0);
";

const SELECT_KV: &str = "SELECT key, value, create_revision, mod_revision FROM kv";

/// The SQLite backend of [`Store`].
pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// For error messages; `:memory:` for an in-memory store.
    path: PathBuf,
    writes: AtomicU64,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("writes", &self.write_count())
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (or creates) the store at `path`, creating or migrating its schema.
    ///
    /// WAL with `synchronous=NORMAL`: a commit is one append to the WAL and no fsync of
    /// the database, which spares the SD card; a power cut may lose the last commits but
    /// never corrupts the file, and the level-triggered loops redo lost work.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let open_err = |source| Error::Open {
            path: path.to_path_buf(),
            source,
        };
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
            path: path.clone(),
            source,
        })?;
        Self::setup(conn, path)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn setup(mut conn: Connection, path: PathBuf) -> Result<SqliteStore> {
        migrate(&mut conn, &path)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            path,
            writes: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while the lock was held cannot have left half a transaction behind:
        // rusqlite's Transaction rolls back when dropped, also while unwinding. So the
        // connection is still consistent and usable.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn err(&self, op: &'static str) -> impl Fn(rusqlite::Error) -> Error + '_ {
        move |source| Error::Sqlite {
            path: self.path.clone(),
            op,
            source,
        }
    }

    fn corrupt(&self, key: &str, reason: String) -> Error {
        Error::CorruptRow {
            path: self.path.clone(),
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
        Ok(KeyValue {
            key,
            value,
            create_revision,
            mod_revision,
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

    fn read_revision(&self, conn: &Connection) -> Result<u64> {
        let raw: Option<i64> = conn
            .prepare_cached("SELECT value FROM meta WHERE name = 'revision'")
            .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
            .map_err(self.err("read revision"))?;
        let raw = raw.ok_or_else(|| self.corrupt("revision", "missing from meta".to_string()))?;
        u64::try_from(raw).map_err(|_| self.corrupt("revision", format!("{raw} is negative")))
    }

    fn mod_revision(&self, conn: &Connection, key: &str) -> Result<u64> {
        let raw: Option<i64> = conn
            .prepare_cached("SELECT mod_revision FROM kv WHERE key = ?1")
            .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
            .map_err(self.err("read"))?;
        match raw {
            None => Ok(0),
            Some(raw) => u64::try_from(raw).ok().filter(|r| *r > 0).ok_or_else(|| {
                self.corrupt(
                    key,
                    format!("mod_revision is {raw}, not a positive revision"),
                )
            }),
        }
    }

    fn apply(&self, conn: &Connection, op: &Op, rev: i64) -> Result<()> {
        let write = self.err("write");
        match op {
            Op::Put { key, value } => {
                // The upsert keeps create_revision on an existing key, as etcd does.
                conn.prepare_cached(
                    "INSERT INTO kv (key, value, create_revision, mod_revision) VALUES (?1, ?2, ?3, ?3)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value, mod_revision = excluded.mod_revision",
                )
                .and_then(|mut s| s.execute(rusqlite::params![key, value, rev]))
                .map_err(write)?;
            }
            Op::Delete { key } => {
                conn.prepare_cached("DELETE FROM kv WHERE key = ?1")
                    .and_then(|mut s| s.execute([key]))
                    .map_err(write)?;
            }
            Op::DeletePrefix { prefix } => {
                let done = match prefix_end(prefix) {
                    Some(end) => conn
                        .prepare_cached("DELETE FROM kv WHERE key >= ?1 AND key < ?2")
                        .and_then(|mut s| s.execute([prefix, &end])),
                    None => conn
                        .prepare_cached("DELETE FROM kv WHERE key >= ?1")
                        .and_then(|mut s| s.execute([prefix])),
                };
                done.map_err(write)?;
            }
        }
        Ok(())
    }
}

impl Store for SqliteStore {
    fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(&format!("{SELECT_KV} WHERE key = ?1"))
            .map_err(self.err("read"))?;
        let mut rows = stmt.query([key]).map_err(self.err("read"))?;
        match rows.next().map_err(self.err("read"))? {
            Some(row) => Ok(Some(self.row(row)?)),
            None => Ok(None),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        let conn = self.lock();
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

    fn txn(&self, compares: &[Compare], ops: &[Op]) -> Result<TxnResult> {
        check_ops(ops)?;
        let mut conn = self.lock();
        // IMMEDIATE takes the write lock now, so nobody (say a `sqlite3` shell) can write
        // between our compares and our ops.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.err("begin transaction"))?;
        let current = self.read_revision(&tx)?;
        for cmp in compares {
            let Compare::ModRevision { key, rev } = cmp;
            if self.mod_revision(&tx, key)? != *rev {
                // Dropping `tx` rolls back; nothing was written.
                return Ok(TxnResult {
                    succeeded: false,
                    revision: current,
                });
            }
        }
        if ops.is_empty() {
            return Ok(TxnResult {
                succeeded: true,
                revision: current,
            });
        }
        let next = current + 1;
        // SQLite integers are i64; 2^63 revisions is beyond any SD card's life.
        let next_sql = i64::try_from(next)
            .map_err(|_| self.corrupt("revision", format!("{current} cannot grow")))?;
        for op in ops {
            self.apply(&tx, op, next_sql)?;
        }
        tx.prepare_cached("UPDATE meta SET value = ?1 WHERE name = 'revision'")
            .and_then(|mut s| s.execute([next_sql]))
            .map_err(self.err("write"))?;
        tx.commit().map_err(self.err("commit"))?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(TxnResult {
            succeeded: true,
            revision: next,
        })
    }

    fn revision(&self) -> Result<u64> {
        let conn = self.lock();
        self.read_revision(&conn)
    }

    fn write_count(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

/// Creates the schema in a new file, checks it in an existing one. Runs in one
/// IMMEDIATE transaction so two processes opening a new file at once cannot both
/// create it.
fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let open_err = |source| Error::Open {
        path: path.to_path_buf(),
        source,
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(open_err)?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(open_err)?;
    let count_tables = |only_ours: bool| -> Result<i64> {
        let sql = if only_ours {
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('kv', 'meta')"
        } else {
            "SELECT count(*) FROM sqlite_master"
        };
        tx.query_row(sql, [], |row| row.get(0)).map_err(open_err)
    };
    match version {
        0 => {
            // A database with user_version 0 but with tables is someone else's file.
            if count_tables(false)? != 0 {
                return Err(Error::NotAStore {
                    path: path.to_path_buf(),
                });
            }
            tx.execute_batch(SCHEMA).map_err(open_err)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(open_err)?;
        }
        SCHEMA_VERSION => {
            if count_tables(true)? != 2 {
                return Err(Error::NotAStore {
                    path: path.to_path_buf(),
                });
            }
        }
        found if found > SCHEMA_VERSION => {
            return Err(Error::SchemaTooNew {
                path: path.to_path_buf(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        _ => {
            return Err(Error::NotAStore {
                path: path.to_path_buf(),
            })
        }
    }
    tx.commit().map_err(open_err)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Barrier};

    use super::*;
    use crate::store::StoreExt;

    fn put(key: &str, value: &str) -> Op {
        Op::Put {
            key: key.to_string(),
            value: value.as_bytes().to_vec(),
        }
    }

    fn rev(key: &str, rev: u64) -> Compare {
        Compare::ModRevision {
            key: key.to_string(),
            rev,
        }
    }

    fn keys(store: &dyn Store, prefix: &str) -> Vec<String> {
        store
            .list(prefix)
            .expect("list")
            .into_iter()
            .map(|kv| kv.key)
            .collect()
    }

    fn mem() -> SqliteStore {
        SqliteStore::open_in_memory().expect("in-memory store")
    }

    #[test]
    fn creating_an_absent_key_succeeds_once() {
        let s = mem();
        let first = s.txn(&[rev("/a", 0)], &[put("/a", "1")]).expect("txn");
        assert_eq!(
            first,
            TxnResult {
                succeeded: true,
                revision: 1
            }
        );
        let second = s.txn(&[rev("/a", 0)], &[put("/a", "2")]).expect("txn");
        assert_eq!(
            second,
            TxnResult {
                succeeded: false,
                revision: 1
            }
        );
        let kv = s.get("/a").expect("get").expect("present");
        assert_eq!(kv.value, b"1");
        assert_eq!((kv.create_revision, kv.mod_revision), (1, 1));
    }

    #[test]
    fn a_stale_revision_fails_and_changes_nothing() {
        let s = mem();
        s.txn(&[], &[put("/a", "1"), put("/b", "1")]).expect("txn");
        s.txn(&[], &[put("/a", "2")]).expect("txn");
        let a = s.get("/a").expect("get").expect("present");
        assert_eq!((a.create_revision, a.mod_revision), (1, 2));

        // One stale compare among good ones fails the whole transaction.
        let r = s
            .txn(
                &[rev("/b", 1), rev("/a", 1)],
                &[put("/a", "3"), put("/b", "3")],
            )
            .expect("txn");
        assert!(!r.succeeded);
        assert_eq!(s.get("/a").expect("get").expect("present").value, b"2");
        assert_eq!(s.get("/b").expect("get").expect("present").value, b"1");
        assert_eq!(s.revision().expect("revision"), 2);

        let r = s.txn(&[rev("/a", 2)], &[put("/a", "3")]).expect("txn");
        assert_eq!(
            r,
            TxnResult {
                succeeded: true,
                revision: 3
            }
        );
    }

    #[test]
    fn deletes_only_at_the_expected_revision() {
        let s = mem();
        let created = s.txn(&[], &[put("/a", "1")]).expect("txn").revision;
        assert!(!s.cas_delete("/a", created + 7).expect("cas"));
        assert!(s.get("/a").expect("get").is_some());
        assert!(s.cas_delete("/a", created).expect("cas"));
        assert_eq!(s.get("/a").expect("get"), None);
        // Absent again: a create-if-absent works, and starts a new create revision.
        assert!(s.cas_json("/a", 0, &5).expect("cas"));
        let kv = s.get("/a").expect("get").expect("present");
        assert_eq!((kv.create_revision, kv.mod_revision), (3, 3));
    }

    #[test]
    fn revisions_stay_monotonic_across_reopen_even_when_everything_is_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.db");
        let before = {
            let s = SqliteStore::open(&path).expect("open");
            s.txn(&[], &[put("/a", "1")]).expect("txn");
            s.txn(&[], &[put("/b", "1")]).expect("txn");
            s.txn(&[], &[Op::DeletePrefix { prefix: "/".into() }])
                .expect("txn");
            s.revision().expect("revision")
        };
        assert_eq!(before, 3);
        let s = SqliteStore::open(&path).expect("reopen");
        assert_eq!(s.revision().expect("revision"), 3);
        let r = s.txn(&[], &[put("/a", "2")]).expect("txn");
        assert_eq!(r.revision, 4);
        assert_eq!(
            s.get("/a").expect("get").expect("present").create_revision,
            4
        );
    }

    #[test]
    fn persists_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.db");
        {
            let s = SqliteStore::open(&path).expect("open");
            s.put_json("/nodes/pi1", &serde_json::json!({"arch": "arm64"}))
                .expect("put");
            s.txn(&[], &[put("/tasks/x", "x"), put("/tasks/y", "y")])
                .expect("txn");
        }
        let s = SqliteStore::open(&path).expect("reopen");
        assert_eq!(keys(&s, "/"), ["/nodes/pi1", "/tasks/x", "/tasks/y"]);
        let (node, rev): (serde_json::Value, u64) =
            s.get_json("/nodes/pi1").expect("get").expect("present");
        assert_eq!(node["arch"], "arm64");
        assert_eq!(rev, 1);
        assert_eq!(s.write_count(), 0, "reopening writes nothing");
    }

    #[test]
    fn list_by_prefix_does_not_leak_neighbours() {
        let s = mem();
        let all = [
            "/tasks/a",
            "/tasks/a/1",
            "/tasks/ab",
            "/tasks/b",
            "/tasks0",
            "/task",
            "/tasks/a\u{10FFFF}",
        ];
        let ops: Vec<Op> = all.iter().map(|k| put(k, "v")).collect();
        s.txn(&[], &ops).expect("txn");
        assert_eq!(keys(&s, "/tasks/a/"), ["/tasks/a/1"]);
        assert_eq!(
            keys(&s, "/tasks/a"),
            ["/tasks/a", "/tasks/a/1", "/tasks/ab", "/tasks/a\u{10FFFF}"]
        );
        assert_eq!(
            keys(&s, "/tasks/"),
            [
                "/tasks/a",
                "/tasks/a/1",
                "/tasks/ab",
                "/tasks/a\u{10FFFF}",
                "/tasks/b"
            ]
        );
        assert_eq!(keys(&s, "/nodes/"), Vec::<String>::new());
        assert_eq!(keys(&s, "").len(), all.len());
    }

    #[test]
    fn delete_prefix_removes_exactly_the_prefix() {
        let s = mem();
        let ops: Vec<Op> = ["/t/a/1", "/t/a/2", "/t/ab", "/t/a", "/u"]
            .iter()
            .map(|k| put(k, "v"))
            .collect();
        s.txn(&[], &ops).expect("txn");
        let r = s
            .txn(
                &[],
                &[Op::DeletePrefix {
                    prefix: "/t/a/".into(),
                }],
            )
            .expect("txn");
        assert!(r.succeeded);
        assert_eq!(keys(&s, ""), ["/t/a", "/t/ab", "/u"]);
    }

    #[test]
    fn write_count_bumps_only_on_successful_transactions_with_ops() {
        let s = mem();
        assert_eq!(s.write_count(), 0);
        s.txn(&[], &[]).expect("empty txn");
        s.txn(&[rev("/a", 0)], &[]).expect("compare-only txn");
        assert_eq!(s.write_count(), 0);
        s.txn(&[rev("/a", 0)], &[put("/a", "1")]).expect("txn");
        assert_eq!(s.write_count(), 1);
        s.txn(&[rev("/a", 0)], &[put("/a", "2")])
            .expect("failed txn");
        assert_eq!(s.write_count(), 1);
        s.get("/a").expect("get");
        s.list("/").expect("list");
        s.revision().expect("revision");
        assert_eq!(s.write_count(), 1);
        // An identical value is still a write: callers must not do it at rest.
        s.txn(&[], &[put("/a", "1")]).expect("txn");
        assert_eq!(s.write_count(), 2);
        assert!(s.txn(&[], &[put("/a", "1"), put("/a", "2")]).is_err());
        assert_eq!(s.write_count(), 2);
    }

    #[test]
    fn concurrent_compare_and_swap_has_exactly_one_winner_per_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.db");
        // Two stores on one file stand for two controllers: they race through SQLite's
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
                        if s.cas_json(&key, 0, &t).expect("cas") {
                            won.push((k, "create"));
                        }
                        let (_, r): (usize, u64) = s.get_json(&key).expect("get").expect("present");
                        if s.cas_json(&key, r, &t).expect("cas") {
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
        assert_eq!(stores[0].revision().expect("revision"), successes as u64);
    }

    #[test]
    fn json_helpers_round_trip_and_name_undecodable_keys() {
        let s = mem();
        let r = s.put_json("/w/a", &vec![1, 2]).expect("put");
        assert!(s.cas_json("/w/b", 0, &vec![3]).expect("cas"));
        assert!(!s.cas_json("/w/b", 0, &vec![4]).expect("cas"));
        let listed: Vec<(Vec<u32>, u64)> = s.list_json("/w/").expect("list");
        assert_eq!(listed, [(vec![1, 2], r), (vec![3], r + 1)]);
        assert_eq!(s.get_json::<Vec<u32>>("/w/none").expect("get"), None);

        s.txn(&[], &[put("/w/bad", "{not json")]).expect("txn");
        let err = s.list_json::<Vec<u32>>("/w/").expect_err("bad value");
        assert!(
            matches!(&err, Error::Decode { key, .. } if key == "/w/bad"),
            "{err}"
        );
        assert!(err.to_string().contains("/w/bad"));
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
            Err(Error::NotAStore { .. })
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
                    supported: 1,
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
                    "INSERT INTO kv VALUES ('/neg', x'00', -1, -1);
                     INSERT INTO kv VALUES ('/text', 'a string, not a blob', 1, 1);",
                )
            })
            .expect("tamper");
        let s = SqliteStore::open(&path).expect("reopen");
        for key in ["/neg", "/text"] {
            let err = s.get(key).expect_err("corrupt row");
            assert!(
                matches!(&err, Error::CorruptRow { key: k, .. } if k == key),
                "{err}"
            );
        }
        assert!(s.list("/").is_err());
        // A compare against a corrupt row is an error, not a guess.
        assert!(s.txn(&[rev("/neg", 0)], &[put("/x", "1")]).is_err());
        assert_eq!(s.write_count(), 0);
    }
}
