//! Before a training step allocates anything, its planned peak memory is
//! compared with the memory the process can have; a step that cannot fit is
//! refused with its peak, what is available and what would fit, instead of
//! the allocator aborting the process (or the kernel's OOM killer ending it)
//! partway through initialising the parameters.
//!
//! Available memory: on the host, the least of `MemAvailable`
//! (/proc/meminfo), the cgroup's `memory.max` less its `memory.current`
//! (cgroup v2) and the address-space limit (`ulimit -v`) less what the
//! process already maps; on a CUDA device, the device's free memory when the
//! backend can tell.

use tessera_compiler::ir::Graph;
use tessera_compiler::memory::human_bytes;
use tessera_compiler::plan::Plan;

/// Memory a run can have, and where the figure comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct Available {
    pub bytes: u64,
    pub source: String,
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// The "Max address space" soft limit of /proc/self/limits (None: unlimited).
fn address_space_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max address space"))?;
    line["Max address space".len()..].split_whitespace().next()?.parse().ok()
}

/// `VmSize` of /proc/self/status, in bytes.
fn vm_size(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmSize:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// The cgroup v2 directory of this process (`0::/path` in /proc/self/cgroup).
fn cgroup_dir(cgroup: &str) -> Option<String> {
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(format!("/sys/fs/cgroup{}", path.trim_end()))
}

/// Room left under the cgroup's memory limit, if one is set.
fn cgroup_room() -> Option<(u64, String)> {
    let dirs = [read("/proc/self/cgroup").and_then(|c| cgroup_dir(&c)), Some("/sys/fs/cgroup".to_string())];
    for dir in dirs.into_iter().flatten() {
        let Some(max) = read(&format!("{dir}/memory.max")) else { continue };
        let Ok(max) = max.trim().parse::<u64>() else { continue }; // "max": no limit here
        let used = read(&format!("{dir}/memory.current")).and_then(|c| c.trim().parse::<u64>().ok()).unwrap_or(0);
        return Some((max.saturating_sub(used), format!("the cgroup limit {dir}/memory.max ({})", human_bytes(max))));
    }
    None
}

/// What the host lets this process allocate (None where nothing can be read).
pub fn host_available() -> Option<Available> {
    let mut best: Option<Available> = None;
    let mut take = |bytes: u64, source: String| {
        if best.as_ref().is_none_or(|b| bytes < b.bytes) {
            best = Some(Available { bytes, source });
        }
    };
    if let Some(b) = read("/proc/meminfo").and_then(|m| mem_available(&m)) {
        take(b, "MemAvailable in /proc/meminfo".to_string());
    }
    if let Some((b, source)) = cgroup_room() {
        take(b, source);
    }
    if let Some(limit) = read("/proc/self/limits").and_then(|l| address_space_limit(&l)) {
        let used = read("/proc/self/status").and_then(|s| vm_size(&s)).unwrap_or(0);
        take(limit.saturating_sub(used), format!("the address-space limit (ulimit -v) of {}", human_bytes(limit)));
    }
    best
}

/// The largest parameters of a plan's graph, for the message.
fn parameters_note(graph: &Graph, batch: u64) -> String {
    let params = graph.params();
    let mut total: u64 = 0;
    let mut largest: Option<(u64, String, String)> = None;
    for (v, name, _) in &params {
        let ty = graph.ty(*v);
        let n: u64 = ty.shape.0.iter().map(|d| d.eval(batch)).product();
        total = total.saturating_add(n);
        if largest.as_ref().is_none_or(|l| n > l.0) {
            largest = Some((n, name.to_string(), ty.shape.to_string()));
        }
    }
    match largest {
        Some((n, name, shape)) => format!(
            "the model has {total} parameters in {} tensors; the largest is `{name}` {shape} ({n} parameters)",
            params.len()
        ),
        None => "the model has no parameters".to_string(),
    }
}

/// Refuses `plan` (a training step of `batch` per replica) when its planned
/// peak exceeds `available`. `step` is its step graph (for the largest batch
/// that fits) and `graph` the model's (for its parameter count).
pub fn check(
    plan: &Plan,
    batch: u64,
    available: &Available,
    step: &dyn Fn() -> Result<Graph, String>,
    graph: &Graph,
) -> Result<(), String> {
    let Some(m) = plan.memory.as_ref() else { return Ok(()) };
    if m.peak_bytes <= available.bytes {
        return Ok(());
    }
    let p = &m.parts;
    let parts = format!(
        "parameters {}, gradients {}, optimizer state {}, buffers {}, inputs {}, activations kept for backward {}, transient {}",
        human_bytes(p.parameters),
        human_bytes(p.gradients),
        human_bytes(p.optimizer_state),
        human_bytes(p.buffers),
        human_bytes(p.inputs),
        human_bytes(p.activations_kept),
        human_bytes(p.transient)
    );
    let fits = match step().and_then(|g| tessera_compiler::pipeline::max_batch(&g, available.bytes).map_err(|e| e.to_string())) {
        Ok((0, _)) => format!(
            "not even batch 1 fits ({}); use a smaller model or a machine with more memory",
            parameters_note(graph, 1)
        ),
        Ok((b, Some(peak))) => format!(
            "the largest batch that fits is {b} (peak {}): set DATA.TRAIN.BATCHSIZE_PER_REPLICA={b}, or recompute activations (MODEL.ACTIVATION_CHECKPOINTING; see `tessera plan --memory-budget`); {}",
            human_bytes(peak),
            parameters_note(graph, 1)
        ),
        Ok((b, None)) => format!("the largest batch that fits is {b}"),
        Err(e) => format!("the largest batch that fits could not be found: {e}"),
    };
    Err(format!(
        "the training step (batch {batch} per replica) needs {} at its peak ({parts}) but only {} is available ({}); {fits}. Nothing was allocated. `tessera plan --memory` shows the plan",
        human_bytes(m.peak_bytes),
        human_bytes(available.bytes),
        available.source
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_read() {
        assert_eq!(mem_available("MemTotal: 10 kB\nMemAvailable:    2048 kB\n"), Some(2 << 20));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax address space         4294967296           unlimited            bytes\n";
        assert_eq!(address_space_limit(limits), Some(4 << 30));
        let unlimited = "Max address space         unlimited            unlimited            bytes\n";
        assert_eq!(address_space_limit(unlimited), None);
        assert_eq!(vm_size("Name: x\nVmSize:\t    1024 kB\n"), Some(1 << 20));
        assert_eq!(cgroup_dir("0::/user.slice/a\n").as_deref(), Some("/sys/fs/cgroup/user.slice/a"));
        assert!(host_available().is_some_and(|a| a.bytes > 0));
    }
}
