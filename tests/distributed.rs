//! Data-parallel training as a user runs it, with CPU processes on this
//! machine (loopback): N processes with batch b train as one process with
//! batch N x b does (losses and weights within float tolerance), for a
//! supervised ViT with dropout and drop path, MoCo (its queue takes every
//! rank's keys), SimCLR (negatives gathered with gradient) and SwAV
//! (Sinkhorn over all ranks, synchronised batch norm in its head); a killed
//! rank, a rank that never joins and a wrong RUN_ID end the run within a
//! bounded time with a message and no process left; a run whose ranks are
//! all killed resumes to the losses of an uninterrupted one; VISSL's
//! multi-node config (moco/vit_b16) trains as 2 nodes x 2 processes.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod cli;
use cli::{command, ok, records, run, synth_folder, text, tmpdir, wait_for_records};

/// `tessera train config=quickstart/NAME` on `data` with `procs` processes
/// of batch `batch`, two epochs, every step logged.
fn args(name: &str, data: &Path, ckpt: &Path, procs: usize, batch: usize, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "train".to_string(),
        format!("config=quickstart/{name}"),
        format!("DATA.TRAIN.DATA_PATHS=[{}]", data.join("train").display()),
        format!("DATA.TEST.DATA_PATHS=[{}]", data.join("val").display()),
        format!("DATA.TRAIN.BATCHSIZE_PER_REPLICA={batch}"),
        format!("DATA.TEST.BATCHSIZE_PER_REPLICA={batch}"),
        format!("DISTRIBUTED.NUM_PROC_PER_NODE={procs}"),
        // The quickstart's top-5 is above the 4 classes of these tests.
        "METERS.accuracy_list_meter.topk_values=[1, 4]".into(),
        "OPTIMIZER.num_epochs=2".into(),
        format!("CHECKPOINT.DIR={}", ckpt.display()),
        "LOG_FREQUENCY=1".into(),
        "-q".into(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn losses(dir: &Path) -> BTreeMap<u64, f64> {
    records(dir).iter().map(|r| (r["iteration"].as_u64().unwrap(), r["loss"].as_f64().unwrap())).collect()
}

/// The model tensors of the run's latest checkpoint.
fn weights(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let pointer: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("checkpoint.json")).unwrap()).unwrap();
    let latest = dir.join(pointer["latest"].as_str().unwrap()).join("model.safetensors");
    tessera_runtime::weights::read_safetensors(&latest).unwrap().into_iter().map(|t| (t.name, t.data)).collect()
}

/// Trains `name` with 1 process of batch `procs x b` and with `procs`
/// processes of batch b; asserts equal losses and weights.
fn assert_equivalent(root: &Path, name: &str, data: &Path, b: usize, worlds: &[usize], extra: &[&str]) {
    let one = root.join(format!("{name}-1"));
    let wide = worlds.iter().max().unwrap() * b;
    ok(&run(&args(name, data, &one, 1, wide, extra)));
    for &procs in worlds {
        let dir = root.join(format!("{name}-{procs}"));
        ok(&run(&args(name, data, &dir, procs, wide / procs, extra)));
        assert_same_training(&one, &dir, &format!("{name} x{procs}"));
        // The run's shape opens rank 0's log; every rank keeps its own.
        let log = std::fs::read_to_string(dir.join("log.txt")).unwrap();
        assert!(log.contains(&format!("world size {procs}: 1 node(s) x {procs} process(es) per node")), "{log}");
        assert!(log.contains(&format!("rank {}: cpu", procs - 1)), "{log}");
        assert!(dir.join("ranks").join((procs - 1).to_string()).join("log.txt").is_file());
    }
}

/// The runs in `one` and `other` logged the same losses (at least 4 steps,
/// within 1e-4 relative) and ended with the same weights (within 2e-4).
fn assert_same_training(one: &Path, other: &Path, what: &str) {
    let (expect, got) = (losses(one), losses(other));
    assert!(expect.len() >= 4, "{what}: too few steps to compare ({})", expect.len());
    assert_eq!(got.keys().collect::<Vec<_>>(), expect.keys().collect::<Vec<_>>(), "{what}: steps");
    for (it, l) in &expect {
        let g = got[it];
        assert!((g - l).abs() <= 1e-4 * l.abs().max(1.0), "{what}: loss at step {it}: {g} vs {l}");
    }
    let (w1, w) = (weights(one), weights(other));
    assert_eq!(w.keys().collect::<Vec<_>>(), w1.keys().collect::<Vec<_>>(), "{what}: tensors");
    // swav_head's first linear layer feeds its batch norm, which cancels
    // that layer's bias and the trunk's last LayerNorm bias (both add the
    // same vector to every sample): their gradient is zero in exact
    // arithmetic, and AdamW turns its rounding noise into lr-sized steps;
    // the running mean follows them.
    let swav = w1.contains_key("heads.0.projection_head.1.running_mean");
    let before_batch_norm =
        ["heads.0.projection_head.0.bias", "trunk.norm.bias", "heads.0.projection_head.1.running_mean"];
    for (t, v) in &w1 {
        // SwAV's embedding queue is each rank's own share (VISSL's
        // local_emb_queue); the checkpoint holds every rank's, as column
        // blocks: the same embeddings as one process's, in another order.
        if t.contains("local_emb_queue") && t.ends_with(".emb") {
            assert_same_columns(v, &w[t], 16, &format!("{what}: `{t}`"));
            continue;
        }
        if swav && before_batch_norm.contains(&t.as_str()) {
            continue;
        }
        let worst = v.iter().zip(&w[t]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 2e-4, "{what}: `{t}` differs by {worst}");
    }
}

/// `a` and `b` ([rows, columns] row-major) hold the same columns, in any order.
fn assert_same_columns(a: &[f32], b: &[f32], rows: usize, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: sizes");
    let cols = a.len() / rows;
    let column = |m: &[f32], j: usize| (0..rows).map(|i| m[i * cols + j]).collect::<Vec<f32>>();
    let mut unmatched: Vec<Vec<f32>> = (0..cols).map(|j| column(b, j)).collect();
    for j in 0..cols {
        let c = column(a, j);
        let at = unmatched.iter().position(|u| u.iter().zip(&c).all(|(x, y)| (x - y).abs() <= 2e-4));
        assert!(at.is_some(), "{what}: column {j} of one has no match in the other");
        unmatched.remove(at.unwrap());
    }
}

const DROPOUT: [&str; 7] = [
    // 2.3 MB of gradients in buckets of 1 MB: three all-reduces a step.
    "DATA.DDP_BUCKET_CAP_MB=1",
    "MODEL.TRUNK.VISION_TRANSFORMERS.MLP_DIM=2048",
    "MODEL.HEAD.PARAMS=[[mlp, {dims: [64, 4]}]]",
    "MODEL.TRUNK.VISION_TRANSFORMERS.DROPOUT_RATE=0.1",
    "MODEL.TRUNK.VISION_TRANSFORMERS.ATTENTION_DROPOUT_RATE=0.1",
    "MODEL.TRUNK.VISION_TRANSFORMERS.DROP_PATH_RATE=0.2",
    "TEST_MODEL=True",
];

#[test]
fn supervised_vit_with_dropout_trains_the_same_on_1_2_and_4_processes() {
    let root = tmpdir("dp-supervised");
    let data = synth_folder(&root, 4, 16, 4);
    assert_equivalent(&root, "vit_tiny", &data, 4, &[2, 4], &DROPOUT);
    // The test phase's meter counts every rank's shard.
    let phases = |d: &str| -> Vec<Value> {
        std::fs::read_to_string(root.join(d).join("metrics.json"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter_map(|r| r.get("test_accuracy_list_meter").cloned())
            .collect()
    };
    assert_eq!(phases("vit_tiny-4").len(), 2);
    assert_eq!(phases("vit_tiny-4"), phases("vit_tiny-1"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn moco_and_simclr_train_the_same_on_1_and_2_processes() {
    let root = tmpdir("dp-ssl");
    let data = synth_folder(&root, 4, 8, 1);
    let drop = ["MODEL.TRUNK.VISION_TRANSFORMERS.DROP_PATH_RATE=0.1"];
    assert_equivalent(&root, "moco_vit_tiny", &data, 4, &[2], &drop);
    assert_equivalent(&root, "simclr_vit_tiny", &data, 4, &[2], &drop);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn swav_with_synchronised_batch_norm_and_a_queue_trains_the_same_on_1_and_2_processes() {
    let root = tmpdir("dp-swav");
    let data = synth_folder(&root, 4, 8, 1);
    // Sinkhorn's sums over both ranks, the head's batch norm over both
    // ranks' samples (GROUP_SIZE -1: the node's two processes).
    let sync =
        ["MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=True", "MODEL.TRUNK.VISION_TRANSFORMERS.DROP_PATH_RATE=0.1"];
    assert_equivalent(&root, "swav_vit_tiny", &data, 4, &[2], &sync);
    // With a queue of 16 embeddings (8 on each rank) from the second step.
    let queue: Vec<&str> = sync.iter().copied().chain(["LOSS.swav_loss.queue.queue_length=16"]).collect();
    let root2 = root.join("queue");
    std::fs::create_dir_all(&root2).unwrap();
    assert_equivalent(&root2, "swav_vit_tiny", &data, 4, &[2], &queue);
    std::fs::remove_dir_all(&root).unwrap();
}

/// The pids of `parent`'s children.
fn children(parent: u32) -> Vec<u32> {
    let out = Command::new("pgrep").args(["-P", &parent.to_string()]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

/// A slower model, so that a run lasts long enough to be interrupted.
const SLOW: [&str; 4] = [
    "MODEL.HEAD.PARAMS=[[mlp, {dims: [64, 4]}]]",
    "MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS=6",
    "MODEL.TRUNK.VISION_TRANSFORMERS.PATCH_SIZE=4",
    "MODEL.TRUNK.VISION_TRANSFORMERS.DROPOUT_RATE=0.1",
];

/// Starts a long 2-process run, sends `signal` to rank 1 once it trains,
/// and waits for the launcher; its standard error. Asserts that the run
/// failed within 30 s of the signal and left no worker running.
fn signal_rank_1(tag: &str, signal: &str, env: &[(&str, &str)]) -> String {
    let root = tmpdir(tag);
    let data = synth_folder(&root, 4, 16, 1);
    let dir = root.join("run");
    let mut a = args("vit_tiny", &data, &dir, 2, 8, &SLOW);
    a.push("OPTIMIZER.num_epochs=50".into());
    let mut launcher =
        command().args(&a).envs(env.iter().copied()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_records(&mut launcher, &dir, 3);
    let workers = children(launcher.id());
    assert_eq!(workers.len(), 2, "two workers: {workers:?}");
    // Rank 1 is the second worker started.
    let rank1 = *workers.iter().max().unwrap();
    Command::new("kill").args([signal, &rank1.to_string()]).status().unwrap();
    let start = Instant::now();
    let out = launcher.wait_with_output().unwrap();
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(workers.iter().all(|&p| !alive(p)), "a worker outlived the run");
    std::fs::remove_dir_all(&root).unwrap();
    err
}

#[test]
fn a_killed_rank_stops_every_rank_with_a_message_and_leaves_no_process() {
    let err = signal_rank_1("dp-kill", "-KILL", &[]);
    assert!(err.contains("rank 1 was killed (SIGKILL) after step"), "{err}");
}

#[test]
fn a_hung_rank_is_noticed_within_the_timeout_and_every_rank_stops() {
    let err = signal_rank_1("dp-hang", "-STOP", &[("TESSERA_DIST_TIMEOUT", "3")]);
    assert!(err.contains("nothing from rank 1 for 3 s"), "{err}");
}

#[test]
fn a_rank_that_never_joins_or_a_wrong_run_id_ends_in_a_bounded_time() {
    let root = tmpdir("dp-join");
    let data = synth_folder(&root, 4, 4, 1);
    // Rank 0 of 2 started alone (torchrun's variables): rank 1 never comes.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let start = Instant::now();
    let o = command()
        .args(args("vit_tiny", &data, &root.join("alone"), 2, 4, &SLOW))
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("TESSERA_DIST_TIMEOUT", "3")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(start.elapsed() < Duration::from_secs(30));
    let t = text(&o);
    assert!(t.contains("rank 0") && t.contains("rank 1") && t.contains("within 3 s"), "{t}");
    // Node 1 of 2 pointed at a store nobody hosts.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut a = args("vit_tiny", &data, &root.join("lost"), 2, 4, &SLOW);
    a.extend([
        "DISTRIBUTED.NUM_NODES=2".into(),
        format!("DISTRIBUTED.RUN_ID=127.0.0.1:{port}"),
        "--node-rank".into(),
        "1".into(),
    ]);
    let start = Instant::now();
    let o = command().args(&a).env("TESSERA_DIST_TIMEOUT", "3").output().unwrap();
    assert!(!o.status.success());
    assert!(start.elapsed() < Duration::from_secs(30));
    let t = text(&o);
    assert!(t.contains("cannot reach the rendezvous store") && t.contains("DISTRIBUTED.RUN_ID"), "{t}");
    assert!(t.contains("rank 2 exited with status 1") || t.contains("rank 3 exited with status 1"), "{t}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// Trains `name` with 2 processes for 3 epochs, kills every rank (and the
/// launcher) with SIGKILL mid-run, resumes: the losses are bitwise those
/// of an uninterrupted run.
fn assert_resumes_bitwise(root: &Path, name: &str, data: &Path, extra: &[&str]) {
    let a = |dir: &PathBuf| {
        let mut a = args(name, data, dir, 2, 8, extra);
        a.extend(["OPTIMIZER.num_epochs=3".into(), "CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=3".into()]);
        a
    };
    let loss_text = |dir: &Path| -> BTreeMap<u64, String> {
        records(dir).iter().map(|r| (r["iteration"].as_u64().unwrap(), r["loss"].to_string())).collect()
    };
    let whole = root.join(format!("{name}-whole"));
    ok(&run(&a(&whole)));
    let expect = loss_text(&whole);
    assert_eq!(expect.len(), 12, "{name}: 3 epochs of 4 steps");
    let killed = root.join(format!("{name}-killed"));
    let mut launcher = command().args(a(&killed)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for_records(&mut launcher, &killed, 5);
    let workers = children(launcher.id());
    for p in &workers {
        Command::new("kill").args(["-KILL", &p.to_string()]).status().unwrap();
    }
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    assert!(records(&killed).len() < 12, "{name}: killed too late");
    ok(&run(&a(&killed)));
    assert!(std::fs::read_to_string(killed.join("log.txt")).unwrap().contains("resuming from"));
    assert_eq!(loss_text(&killed), expect, "{name}: resumed losses differ from the uninterrupted run's");
}

#[test]
fn a_multi_process_run_killed_whole_resumes_to_the_same_losses() {
    let root = tmpdir("dp-resume");
    let data = synth_folder(&root, 4, 16, 1);
    assert_resumes_bitwise(&root, "vit_tiny", &data, &SLOW);
    // SwAV's per-rank queues come back to their ranks.
    let swav = ["MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=True", "LOSS.swav_loss.queue.queue_length=32"];
    assert_resumes_bitwise(&root, "swav_vit_tiny", &data, &swav);
    // Another world size is refused, naming both.
    let part = root.join("part");
    let mut first = args("vit_tiny", &data, &part, 2, 8, &SLOW);
    first.extend(["--max-steps".into(), "2".into()]);
    ok(&run(&first));
    let t = text(&run(&args("vit_tiny", &data, &part, 4, 4, &SLOW)));
    assert!(t.contains("written by a run of 2 process(es); this run has 4"), "{t}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// Starts `world` workers as another launcher would, with `env(rank)` each.
fn start_as_launched(a: &[String], world: usize, env: impl Fn(usize) -> Vec<(String, String)>) -> Vec<Child> {
    (0..world)
        .map(|r| command().args(a).envs(env(r)).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap())
        .collect()
}

#[test]
fn torchrun_and_srun_variables_start_the_same_run() {
    let root = tmpdir("dp-env");
    let data = synth_folder(&root, 4, 8, 1);
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    // torchrun --nproc-per-node 2 --no-python tessera train ... (without its agent store).
    let torchrun = root.join("torchrun");
    let port = free();
    let mut a = args("vit_tiny", &data, &torchrun, 1, 8, &[]);
    a.extend(["--max-steps".into(), "2".into()]);
    let kids = start_as_launched(&a, 2, |r| {
        [("RANK", r.to_string()), ("LOCAL_RANK", r.to_string()), ("WORLD_SIZE", "2".into())]
            .into_iter()
            .chain([
                ("LOCAL_WORLD_SIZE", "2".into()),
                ("MASTER_ADDR", "127.0.0.1".into()),
                ("MASTER_PORT", port.clone()),
            ])
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    });
    // srun --ntasks 2 --ntasks-per-node 2 tessera train ... DISTRIBUTED.RUN_ID=host:port
    let srun = root.join("srun");
    let mut b = args("vit_tiny", &data, &srun, 1, 8, &[]);
    b.extend([format!("DISTRIBUTED.RUN_ID=127.0.0.1:{}", free()), "--max-steps".into(), "2".into()]);
    let tasks = start_as_launched(&b, 2, |r| {
        [("SLURM_PROCID", r.to_string()), ("SLURM_LOCALID", r.to_string()), ("SLURM_NTASKS", "2".into())]
            .into_iter()
            .chain([("SLURM_NTASKS_PER_NODE", "2".into())])
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    });
    // A node rank asked for beside the launcher's must agree with it.
    let t = text(
        &command()
            .args(args("vit_tiny", &data, &root.join("node"), 1, 8, &["DISTRIBUTED.NODE_ID=1"]))
            .envs([("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")])
            .output()
            .unwrap(),
    );
    assert!(t.contains("node rank 1") && t.contains("differs from the launcher's"), "{t}");
    for (what, dir, procs) in [("torchrun", &torchrun, kids), ("srun", &srun, tasks)] {
        for p in procs {
            let o = p.wait_with_output().unwrap();
            assert!(o.status.success(), "{what}: {}", String::from_utf8_lossy(&o.stderr));
        }
        let log = std::fs::read_to_string(dir.join("log.txt")).unwrap();
        assert!(log.contains("world size 2: 1 node(s) x 2 process(es) per node"), "{what}: {log}");
        assert_eq!(records(dir).len(), 2, "{what}");
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn the_cuda_executor_trains_data_parallel_as_one_process_does() {
    // The CUDA executor on the host device: its collectives are the ones a
    // GPU runs through NCCL, here through the TCP ring on host memory; its
    // dropout, attention dropout and drop path kernels draw the global
    // batch's masks (the rank term in kernels/prelude.cuh).
    let root = tmpdir("dp-cuda-host");
    let data = synth_folder(&root, 4, 8, 1);
    let extra = [
        "MODEL.HEAD.PARAMS=[[mlp, {dims: [64, 4]}]]",
        "TEST_MODEL=False",
        "MODEL.TRUNK.VISION_TRANSFORMERS.DROPOUT_RATE=0.1",
        "MODEL.TRUNK.VISION_TRANSFORMERS.ATTENTION_DROPOUT_RATE=0.1",
        "MODEL.TRUNK.VISION_TRANSFORMERS.DROP_PATH_RATE=0.2",
    ];
    let one = root.join("cpu-1");
    ok(&run(&args("vit_tiny", &data, &one, 1, 8, &extra)));
    let two = root.join("cuda-host-2");
    let mut a = args("vit_tiny", &data, &two, 2, 4, &extra);
    a.extend(["--device".into(), "cuda-host".into()]);
    ok(&run(&a));
    assert_same_training(&one, &two, "vit_tiny on cuda-host x2");
    assert!(std::fs::read_to_string(two.join("log.txt"))
        .unwrap()
        .contains("rank 1: host emulation of the CUDA executor"));
    // MoCo (every rank's keys into the queue) and SimCLR (negatives gathered
    // with gradient, this rank's diagonal) on the CUDA executor.
    let drop = ["MODEL.TRUNK.VISION_TRANSFORMERS.DROP_PATH_RATE=0.1"];
    for name in ["moco_vit_tiny", "simclr_vit_tiny"] {
        let one = root.join(format!("{name}-cpu-1"));
        ok(&run(&args(name, &data, &one, 1, 8, &drop)));
        let two = root.join(format!("{name}-cuda-host-2"));
        let mut a = args(name, &data, &two, 2, 4, &drop);
        a.extend(["--device".into(), "cuda-host".into()]);
        ok(&run(&a));
        assert_same_training(&one, &two, &format!("{name} on cuda-host x2"));
    }
    // SwAV with synchronised batch norm: the head's statistics summed over
    // both ranks between passes of the batch-norm kernels (f64 collectives).
    let sync = ["MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=True"];
    let one = root.join("swav-cpu-1");
    ok(&run(&args("swav_vit_tiny", &data, &one, 1, 8, &sync)));
    let two = root.join("swav-cuda-host-2");
    let mut a = args("swav_vit_tiny", &data, &two, 2, 4, &sync);
    a.extend(["--device".into(), "cuda-host".into()]);
    ok(&run(&a));
    assert_same_training(&one, &two, "swav_vit_tiny with SyncBN on cuda-host x2");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn sigterm_stops_every_rank_after_the_same_step_with_a_checkpoint() {
    let root = tmpdir("dp-term");
    let data = synth_folder(&root, 4, 16, 1);
    let dir = root.join("run");
    let mut a = args("vit_tiny", &data, &dir, 2, 8, &SLOW);
    a.push("OPTIMIZER.num_epochs=50".into());
    let mut launcher = command().args(&a).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_records(&mut launcher, &dir, 3);
    Command::new("kill").args(["-TERM", &launcher.id().to_string()]).status().unwrap();
    let out = launcher.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // The ranks agree on the step (one that went on alone would wait in a
    // collective for the other and fail).
    assert!(out.status.success(), "{err}");
    assert!(err.contains("stopped by signal after iteration"), "{err}");
    let pointer: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("checkpoint.json")).unwrap()).unwrap();
    let name = pointer["latest"].as_str().unwrap().to_string();
    assert!(name.starts_with("model_iteration") && dir.join(&name).join("model.safetensors").is_file(), "{name}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// Rank 0 alone, the run's writer, locks CHECKPOINT.DIR (the other ranks
/// share it and keep `ranks/<r>/` there): a data-parallel run trains
/// with its ranks on one directory and leaves no lock, and one started on a
/// directory another run holds stops on every rank, naming the holder.
#[test]
fn only_rank_0_locks_the_checkpoint_directory_and_a_held_one_stops_every_rank() {
    let root = tmpdir("dp-lock");
    let data = synth_folder(&root, 4, 8, 1);
    let dir = root.join("run");
    ok(&run(&args("vit_tiny", &data, &dir, 2, 8, &["TEST_MODEL=false"])));
    assert!(!dir.join("tessera.lock").exists());
    // Held by a live process of this host: this test.
    let held = root.join("held");
    std::fs::create_dir_all(&held).unwrap();
    let host = tessera_engine::lock::hostname();
    let me = std::process::id();
    let lock = serde_json::json!({ "pid": me, "host": host, "since": 0, "token": "the-other-run" });
    std::fs::write(held.join("tessera.lock"), lock.to_string()).unwrap();
    let start = Instant::now();
    let o = run(&args("vit_tiny", &data, &held, 2, 8, &["TEST_MODEL=false"]));
    assert!(!o.status.success(), "{}", text(&o));
    assert!(start.elapsed() < Duration::from_secs(60), "every rank stops at once");
    assert!(text(&o).contains(&format!("in use by another run: process {me} on host {host}")), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(held.join("tessera.lock")).unwrap(), lock.to_string(), "left to its holder");
    assert!(!held.join("checkpoint.json").exists() && !held.join("log.txt").exists());
    std::fs::remove_dir_all(&root).unwrap();
}
