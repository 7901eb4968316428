//! The advisory lock on a checkpoint directory: one run at a time writes
//! checkpoints, logs and the pointer in a `CHECKPOINT.DIR`.
//!
//! The lock is the file `tessera.lock` in the directory, created with
//! `create_new` (O_EXCL: of two runs that start together, exactly one
//! creates it), holding the owner's pid, host, start time and a token
//! unique to the acquisition. A second run finds it and is refused with the
//! holder named. A lock whose holder is gone (same host, and `/proc/<pid>`
//! is absent, a zombie, or a later process with the same pid) is stale: it
//! is moved aside under a private name, checked to be the very lock judged
//! stale (the token), removed, and the directory locked again with
//! `create_new`, so two runs taking over one stale lock still end with one
//! owner. A lock of another host is never taken over (its process cannot
//! be seen from here): the message says how to remove it.
//!
//! The owner removes the lock when it is dropped: training returned
//! (finished, stopped by SIGINT/SIGTERM or the step limit, or failed) or
//! panicked. A process killed outright (SIGKILL, a second signal) leaves a
//! stale lock, which the next run on the same host takes over.

use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const LOCK: &str = "tessera.lock";

/// Who holds a lock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    /// Unix seconds when the lock was taken.
    pub since: u64,
    /// The holder's start time (`/proc/<pid>/stat`, clock ticks after boot),
    /// so that a later process given the same pid is not taken for it.
    #[serde(default)]
    pub start: Option<u64>,
    /// Unique to one acquisition.
    pub token: String,
}

impl Holder {
    fn me() -> Holder {
        let pid = std::process::id();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Holder {
            pid,
            host: hostname(),
            since: now.as_secs(),
            start: start_time(pid),
            token: format!("{pid}-{}-{}", now.as_nanos(), COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
        }
    }

    /// `process 123 on host h (since 2024-05-01 12:00:00 UTC)`.
    pub fn describe(&self) -> String {
        format!("process {} on host {} (since {} UTC)", self.pid, self.host, crate::logs::utc(self.since))
    }

    /// Whether the holder may still be running. Another host's process
    /// cannot be seen from here: it counts as running.
    fn alive(&self) -> bool {
        if self.host != hostname() {
            return true;
        }
        if !Path::new("/proc/self").exists() {
            return true; // no /proc: cannot tell
        }
        let Some(stat) = proc_stat(self.pid) else { return false };
        if stat.state == 'Z' || stat.state == 'X' {
            return false;
        }
        match self.start {
            Some(s) => s == stat.start,
            None => true,
        }
    }
}

static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "checkpoint directory {} is in use by another run: {} holds {}. Two runs on one CHECKPOINT.DIR overwrite each other's checkpoints: wait for that run to end, stop it, or give this one another CHECKPOINT.DIR.{}",
        dir.display(),
        holder.describe(),
        lock.display(),
        if *other_host { format!(" If that process is gone (tessera cannot see processes of host {}), remove {}.", holder.host, lock.display()) } else { String::new() }
    )]
    Held { dir: PathBuf, lock: PathBuf, holder: Box<Holder>, other_host: bool },
    #[error("cannot lock checkpoint directory {}: {}: {message}", dir.display(), lock.display())]
    Io { dir: PathBuf, lock: PathBuf, message: String },
}

/// A held lock; dropping it releases it.
#[derive(Debug)]
pub struct DirLock {
    path: PathBuf,
    holder: Holder,
}

impl DirLock {
    /// Locks `dir` (created if missing). Returns the lock and, when a stale
    /// lock was taken over, a line saying whose.
    pub fn acquire(dir: &Path) -> Result<(DirLock, Option<String>), LockError> {
        let path = dir.join(LOCK);
        let io = |message: String| LockError::Io { dir: dir.to_path_buf(), lock: path.clone(), message };
        fs::create_dir_all(dir).map_err(|e| io(format!("cannot create the directory: {e}")))?;
        let me = Holder::me();
        let mut took_over: Option<String> = None;
        let text = serde_json::to_vec_pretty(&me).map_err(|e| io(e.to_string()))?;
        // Each pass either takes the lock, refuses, or removes a stale one
        // (then tries again); a lock that keeps changing under us is an error.
        for _ in 0..50 {
            match fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    let written = f.write_all(&text).and_then(|()| f.sync_all());
                    if let Err(e) = written {
                        let _ = fs::remove_file(&path);
                        return Err(io(e.to_string()));
                    }
                    return Ok((DirLock { path, holder: me }, took_over));
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(e.to_string())),
            }
            let bytes = match fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == ErrorKind::NotFound => continue, // released meanwhile
                Err(e) => return Err(io(e.to_string())),
            };
            let holder = match serde_json::from_slice::<Holder>(&bytes) {
                Ok(h) => h,
                Err(_) => {
                    // Being written by a run that just created it, or left
                    // empty by one that died between creating and writing.
                    let age = fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| SystemTime::now().duration_since(t).ok())
                        .unwrap_or_default();
                    if age < Duration::from_secs(2) {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    if remove_if_same(&path, &bytes, &me).map_err(|e| io(e.to_string()))? {
                        took_over = Some(format!("removed the unreadable lock file {}", path.display()));
                    }
                    continue;
                }
            };
            if holder.alive() {
                let other_host = holder.host != me.host;
                return Err(LockError::Held {
                    dir: dir.to_path_buf(),
                    lock: path,
                    holder: Box::new(holder),
                    other_host,
                });
            }
            if remove_if_same(&path, &bytes, &me).map_err(|e| io(e.to_string()))? {
                took_over = Some(format!(
                    "took over the stale lock {} of {}, which is no longer running",
                    path.display(),
                    holder.describe()
                ));
            }
        }
        Err(io("the lock file kept changing; is another run starting in this directory?".into()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn holder(&self) -> &Holder {
        &self.holder
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Only our own lock is removed.
        let ours = fs::read(&self.path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Holder>(&b).ok())
            .is_some_and(|h| h.token == self.holder.token);
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Removes the lock at `path` if it still holds `bytes` (the lock judged
/// stale): it is first moved to a name private to this acquisition, so no
/// other run's lock is ever removed; one moved by mistake (another run took
/// over first and locked) is put back. Whether the stale lock was removed.
fn remove_if_same(path: &Path, bytes: &[u8], me: &Holder) -> std::io::Result<bool> {
    let aside = path.with_file_name(format!(".{LOCK}.stale-{}", me.token));
    match fs::rename(path, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    let moved = fs::read(&aside)?;
    if moved == bytes {
        fs::remove_file(&aside)?;
        return Ok(true);
    }
    // Another run's fresh lock: back in place (a link fails rather than
    // replace a lock made meanwhile).
    let _ = fs::hard_link(&aside, path);
    fs::remove_file(&aside)?;
    Ok(false)
}

/// This machine's name (`/proc/sys/kernel/hostname`, else $HOSTNAME).
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}

struct ProcStat {
    state: char,
    start: u64,
}

/// State and start time of process `pid` from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ...`: comm may hold spaces and parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is the first after comm; field 22 (starttime) the 20th.
    Some(ProcStat { state: fields.first()?.chars().next()?, start: fields.get(19)?.parse().ok()? })
}

fn start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|s| s.start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tessera-lock-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn one_holder_at_a_time_and_the_lock_goes_with_its_owner() {
        let dir = tmpdir("held");
        let (lock, note) = DirLock::acquire(&dir).unwrap();
        assert!(note.is_none());
        let e = DirLock::acquire(&dir).unwrap_err().to_string();
        let pid = std::process::id().to_string();
        assert!(e.contains("is in use by another run") && e.contains(&pid) && e.contains(&hostname()), "{e}");
        drop(lock);
        assert!(!dir.join(LOCK).exists());
        let (again, _) = DirLock::acquire(&dir).unwrap();
        drop(again);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_dead_holders_lock_is_taken_over_and_another_hosts_is_not() {
        let dir = tmpdir("stale");
        fs::create_dir_all(&dir).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = Holder { pid: dead, host: hostname(), since: 0, start: None, token: "old".into() };
        fs::write(dir.join(LOCK), serde_json::to_vec(&stale).unwrap()).unwrap();
        let (lock, note) = DirLock::acquire(&dir).unwrap();
        let note = note.unwrap();
        assert!(note.contains(&format!("process {dead} on host")) && note.contains("1970-01-01"), "{note}");
        assert_eq!(lock.holder().pid, std::process::id());
        drop(lock);
        // A pid reused by a later process is not the holder either.
        let reused = Holder { pid: std::process::id(), start: Some(1), ..stale.clone() };
        fs::write(dir.join(LOCK), serde_json::to_vec(&reused).unwrap()).unwrap();
        drop(DirLock::acquire(&dir).unwrap());
        // Another host's holder cannot be seen from here: refused, with the way out.
        let remote = Holder { host: "elsewhere".into(), ..stale };
        fs::write(dir.join(LOCK), serde_json::to_vec(&remote).unwrap()).unwrap();
        let e = DirLock::acquire(&dir).unwrap_err().to_string();
        assert!(e.contains("on host elsewhere") && e.contains("remove") && e.contains(LOCK), "{e}");
        assert_eq!(fs::read(dir.join(LOCK)).unwrap(), serde_json::to_vec(&remote).unwrap(), "left as it was");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unreadable_lock_left_long_ago_is_removed() {
        let dir = tmpdir("unreadable");
        fs::create_dir_all(&dir).unwrap();
        // A run that died between creating the lock and writing it.
        let f = fs::File::create(dir.join(LOCK)).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(60)).unwrap();
        drop(f);
        let (lock, note) = DirLock::acquire(&dir).unwrap();
        assert!(note.unwrap().contains("removed the unreadable lock file"));
        assert_eq!(lock.holder().pid, std::process::id());
        drop(lock);
        fs::remove_dir_all(&dir).unwrap();
    }
}
