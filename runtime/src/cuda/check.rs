//! Compile checks of the kernels, without a GPU: every kernel source a plan
//! uses is compiled by NVRTC to PTX for a GPU architecture (sm_90 for the
//! H100/H200) and assembled by `ptxas -v`, which reports registers and
//! spills. A spilling generated kernel is a failure: its program is too
//! large for the register file and should be split.

use super::device::Target;
use super::nvrtc;
use super::source::KernelSource;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What ptxas says of one kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct Assembled {
    pub name: String,
    pub registers: u32,
    pub spill_stores: u64,
    pub spill_loads: u64,
}

/// `ptxas`: TESSERA_PTXAS, CUDA_HOME/bin/ptxas, or the setup script's.
pub fn ptxas() -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("TESSERA_PTXAS") {
        candidates.push(PathBuf::from(p));
    }
    if let Some(h) = std::env::var_os("CUDA_HOME") {
        candidates.push(PathBuf::from(h).join("bin/ptxas"));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/ptxas"));
    candidates.push(super::libs::tools_root().join("bin/ptxas"));
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        "ptxas was not found: set TESSERA_PTXAS or CUDA_HOME, or run scripts/setup-cuda-tools.sh".to_string()
    })
}

/// Reads `ptxas -v` output: "Used N registers" and "N bytes spill stores,
/// M bytes spill loads" per function.
fn parse_ptxas(name: &str, text: &str) -> Result<Assembled, String> {
    let mut a = Assembled { name: name.to_string(), registers: 0, spill_stores: 0, spill_loads: 0 };
    let mut seen = false;
    for line in text.lines() {
        if let Some(i) = line.find("Used ") {
            let n = line[i + 5..].split_whitespace().next().unwrap_or("");
            a.registers = n.parse().map_err(|_| format!("ptxas said `{line}`"))?;
            seen = true;
        }
        if line.contains("spill stores") {
            for part in line.split(',') {
                let words: Vec<&str> = part.split_whitespace().collect();
                let n = words.iter().position(|w| *w == "bytes").and_then(|i| i.checked_sub(1)).map(|i| words[i]);
                let n: u64 = n.and_then(|n| n.parse().ok()).unwrap_or(0);
                if part.contains("spill stores") {
                    a.spill_stores = n;
                } else if part.contains("spill loads") {
                    a.spill_loads = n;
                }
            }
        }
    }
    if !seen {
        return Err(format!("ptxas reported no register count for {name}:\n{text}"));
    }
    Ok(a)
}

/// NVRTC (compute_`sm`) then `ptxas -arch=sm_<sm> -v` on one kernel.
pub fn assemble(k: &KernelSource, sm: u32, ptxas: &Path) -> Result<Assembled, String> {
    let unit = k.unit(&Target::Nvrtc { sm });
    let out = nvrtc::compile(&unit, &k.name, &format!("compute_{sm}"))?;
    let dir = std::env::temp_dir().join(format!("tessera-ptxas-{}-{}", std::process::id(), k.name));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let ptx = dir.join("k.ptx");
    std::fs::write(&ptx, &out.ptx).map_err(|e| format!("cannot write {}: {e}", ptx.display()))?;
    let r = Command::new(ptxas)
        .arg(format!("-arch=sm_{sm}"))
        .arg("-v")
        .arg(&ptx)
        .arg("-o")
        .arg(dir.join("k.cubin"))
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ptxas.display()));
    let _ = std::fs::remove_dir_all(&dir);
    let r = r?;
    let text = format!("{}{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
    if !r.status.success() {
        return Err(format!("ptxas failed on {}:\n{text}", k.name));
    }
    parse_ptxas(&k.name, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_reports_are_read() {
        let text = "ptxas info    : 0 bytes gmem\nptxas info    : Compiling entry function 'k' for 'sm_90'\n\
                    ptxas info    : Function properties for k\n    \
                    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
                    ptxas info    : Used 40 registers, used 0 barriers, 360 bytes cmem[0]\n";
        let a = parse_ptxas("k", text).unwrap();
        assert_eq!((a.registers, a.spill_stores, a.spill_loads), (40, 4, 12));
        assert!(parse_ptxas("k", "nothing").is_err());
    }
}
