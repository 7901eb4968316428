//! `tessera train` as a user runs it, on small generated image folders: a
//! run killed with SIGKILL and resumed gives the per-step losses of an
//! uninterrupted run (bitwise); SIGTERM finishes the step, checkpoints and
//! exits 0; unreadable images become gray with a warning (or an error when
//! asked); bad data paths fail before training; MODEL.WEIGHTS_INIT loads a
//! checkpoint's weights.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

mod cli;
use cli::{command, ok, records, run, synth_folder, text, tmpdir, wait_for_records};

/// The quickstart ViT on `data`, 4 classes, batch 16, everything logged.
fn args(data: &Path, ckpt: &Path, epochs: u32, extra: &[&str]) -> Vec<String> {
    cli::vit_tiny_args(data, ckpt, epochs, extra)
}

/// Loss by iteration; a redone step (after a resume) keeps its last record.
fn losses(dir: &Path) -> BTreeMap<u64, String> {
    records(dir).iter().map(|r| (r["iteration"].as_u64().unwrap(), r["loss"].to_string())).collect()
}

/// A bigger trunk, so that a run lasts long enough to be interrupted.
const SLOW: [&str; 3] = [
    "MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS=6",
    "MODEL.TRUNK.VISION_TRANSFORMERS.PATCH_SIZE=4",
    "MODEL.TRUNK.VISION_TRANSFORMERS.DROPOUT_RATE=0.1",
];

#[test]
fn a_run_killed_with_sigkill_resumes_to_the_same_per_step_losses() {
    let root = tmpdir("kill");
    let data = synth_folder(&root, 4, 32, 8);
    let extra: Vec<&str> = SLOW.iter().copied().chain(["CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=3"]).collect();
    let whole = root.join("whole");
    let o = run(&args(&data, &whole, 4, &extra));
    cli::ok(&o);
    let expect = losses(&whole);
    assert_eq!(expect.len(), 32, "4 epochs of 8 steps");

    let killed = root.join("killed");
    let mut child =
        command().args(args(&data, &killed, 4, &extra)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for_records(&mut child, &killed, 13);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = records(&killed).len();
    assert!(before < 32, "killed too late");
    let o = run(&args(&data, &killed, 4, &extra));
    cli::ok(&o);
    assert!(std::fs::read_to_string(killed.join("log.txt")).unwrap().contains("resuming from"));
    assert_eq!(losses(&killed), expect, "resumed losses differ from the uninterrupted run's");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn sigterm_finishes_the_step_checkpoints_and_exits_cleanly() {
    let root = tmpdir("term");
    let data = synth_folder(&root, 4, 32, 8);
    let ckpt = root.join("run");
    let child =
        command().args(args(&data, &ckpt, 20, &SLOW)).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut child = child;
    wait_for_records(&mut child, &ckpt, 5);
    let st = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {err}", out.status);
    assert!(err.contains("stopped by signal after iteration"), "{err}");
    let pointer: Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("checkpoint.json")).unwrap()).unwrap();
    let name = pointer["latest"].as_str().unwrap().to_string();
    assert!(name.starts_with("model_iteration"), "{name}");
    assert!(ckpt.join(&name).join("model.safetensors").is_file());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn unreadable_images_become_gray_with_a_warning_or_stop_training_when_asked() {
    let root = tmpdir("corrupt");
    let data = synth_folder(&root, 4, 32, 8);
    let bad = data.join("train").join("circle").join("circle_00003.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\n this is not an image").unwrap();
    let ckpt = root.join("run");
    let o = run(&args(&data, &ckpt, 1, &["TEST_MODEL=false"]));
    cli::ok(&o);
    let log = std::fs::read_to_string(ckpt.join("log.txt")).unwrap();
    assert!(log.contains("1 unreadable image(s) replaced by gray ones this epoch"), "{log}");
    assert!(log.contains("circle_00003.png"), "{log}");
    assert!(text(&o).contains("circle_00003.png"), "the warning reaches the terminal too");

    let o = run(&args(&data, &root.join("strict"), 1, &["DATA.TRAIN.ERROR_ON_UNREADABLE_IMAGE=true"]));
    assert!(!o.status.success());
    assert!(text(&o).contains("circle_00003.png"), "{}", text(&o));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn bad_data_paths_fail_before_training_and_name_the_key() {
    let root = tmpdir("paths");
    let data = synth_folder(&root, 4, 32, 8);
    let ckpt = root.join("run");
    let mut a = args(&data, &ckpt, 1, &[]);
    a[2] = format!("DATA.TRAIN.DATA_PATHS=[{}]", root.join("nowhere").display());
    let o = run(&a);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("DATA.TRAIN.DATA_PATHS") && t.contains("nowhere"), "{t}");
    assert!(!ckpt.join("stdout.json").exists(), "nothing trained");

    std::fs::create_dir_all(data.join("train").join("empty_class")).unwrap();
    let o = run(&args(&data, &ckpt, 1, &[]));
    assert!(!o.status.success());
    assert!(text(&o).contains("empty_class"), "{}", text(&o));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn weights_init_starts_from_a_checkpoints_weights() {
    let root = tmpdir("init");
    let data = synth_folder(&root, 4, 32, 8);
    let first = root.join("first");
    let o = run(&args(&data, &first, 1, &["TEST_MODEL=false"]));
    cli::ok(&o);
    let weights = first.join("model_final_checkpoint_phase0").join("model.safetensors");
    // A second run from those weights with lr 0 for the trunk ends with the
    // trunk unchanged (an lr of 0 for every parameter is refused: it would
    // train nothing, so the heads keep a learning rate of their own).
    let second = root.join("second");
    let o = run(&args(
        &data,
        &second,
        1,
        &[
            "TEST_MODEL=false",
            &format!("MODEL.WEIGHTS_INIT.PARAMS_FILE={}", weights.display()),
            "OPTIMIZER.param_schedulers.lr.name=constant",
            "OPTIMIZER.param_schedulers.lr.value=0.0",
            "OPTIMIZER.head_optimizer_params.use_different_lr=True",
            "OPTIMIZER.param_schedulers.lr_head.name=constant",
            "OPTIMIZER.param_schedulers.lr_head.value=0.001",
        ],
    ));
    cli::ok(&o);
    assert!(std::fs::read_to_string(second.join("log.txt")).unwrap().contains("initialised"), "no init logged");
    let trunk = |p: &Path| {
        let mut t = tessera_runtime::weights::read_safetensors(p).unwrap();
        t.retain(|t| t.name.starts_with("trunk."));
        t
    };
    let a = trunk(&weights);
    assert!(!a.is_empty());
    assert_eq!(a, trunk(&second.join("model_final_checkpoint_phase0").join("model.safetensors")));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_gpu_config_without_a_gpu_is_an_error_that_names_what_is_missing() {
    if tessera_runtime::backend::cuda_unavailable().is_none() {
        eprintln!("skipped: this machine has a GPU, so MACHINE.DEVICE=gpu trains on it");
        return;
    }
    let root = tmpdir("nogpu");
    let data = synth_folder(&root, 4, 8, 2);
    let ckpt = root.join("ckpt");
    let out = run(&args(&data, &ckpt, 1, &["MACHINE.DEVICE=gpu"]));
    let t = text(&out);
    assert!(!out.status.success(), "a ViT config asking for a GPU must not train on the CPU silently: {t}");
    assert!(t.contains("MACHINE.DEVICE=cpu"), "the message names the override: {t}");
    assert!(
        t.contains("not found") || t.contains("driver") || t.contains("GPU"),
        "the message names what is missing: {t}"
    );
    assert!(!ckpt.join("checkpoint.json").exists(), "nothing was trained");
}

/// `tessera compile --emit plan` writes a compiled run that `tessera train
/// --plan` runs as it is (the same losses as compiling in the run), and a
/// compiled run of another config, target or plan version is refused.
#[test]
fn a_compiled_run_trains_as_compiling_would_and_is_refused_when_it_does_not_fit() {
    let root = tmpdir("compiled");
    let data = synth_folder(&root, 4, 32, 8);
    let plain = root.join("plain");
    ok(&run(&args(&data, &plain, 1, &[])));
    // The config of the run, as `compile` takes it (no `train`, no `-q`).
    let cfg_args = |ckpt: &Path, extra: &[&str]| -> Vec<String> {
        args(&data, ckpt, 1, extra).into_iter().filter(|a| a != "train" && a != "-q").collect()
    };
    let file = root.join("run.plan");
    let compile = |extra: &[&str], target: &str| {
        let mut c = vec!["compile".to_string()];
        c.extend(cfg_args(&plain, extra));
        c.extend(["--emit", "plan", "--batch", "16", "--eval-batch", "16", "--target", target, "-o"].map(String::from));
        c.push(file.display().to_string());
        run(&c)
    };
    ok(&compile(&[], "cpu"));
    let planned = root.join("planned");
    let with_plan = |ckpt: &Path| {
        let mut a = args(&data, ckpt, 1, &[]);
        a.extend(["--plan".to_string(), file.display().to_string()]);
        a
    };
    ok(&run(&with_plan(&planned)));
    assert_eq!(losses(&plain), losses(&planned), "the compiled run trains the same steps");
    // Each refusal below trains in a fresh folder, so nothing but the plan differs.
    let a = with_plan(&root.join("refused"));

    // Another model: refused, naming the section that differs.
    ok(&compile(&["MODEL.TRUNK.VISION_TRANSFORMERS.MLP_DIM=96"], "cpu"));
    let out = run(&a);
    assert!(!out.status.success());
    assert!(text(&out).contains("other values of MODEL"), "{}", text(&out));
    // Another target.
    ok(&compile(&[], "cuda"));
    let out = run(&a);
    assert!(!out.status.success() && text(&out).contains("made for the cuda target"), "{}", text(&out));
    // Another plan version.
    ok(&compile(&[], "cpu"));
    let this = format!("\"plan_version\":{}", tessera_plan::PLAN_VERSION);
    let t = std::fs::read_to_string(&file).unwrap().replacen(&this, "\"plan_version\":2", 1);
    std::fs::write(&file, t).unwrap();
    let out = run(&a);
    assert!(!out.status.success() && text(&out).contains("plans of version 2"), "{}", text(&out));
    // A batch size it was not compiled for.
    ok(&compile(&[], "cpu"));
    let mut b = args(&data, &root.join("other-batch"), 1, &["DATA.TRAIN.BATCHSIZE_PER_REPLICA=8"]);
    b.extend(["--plan".to_string(), file.display().to_string()]);
    let out = run(&b);
    assert!(!out.status.success() && text(&out).contains("no training step for batch 8"), "{}", text(&out));
}

/// The CUDA executor (on the host device here; a GPU with --device gpu)
/// trains through `tessera train`, and its checkpoints are the CPU's files:
/// a run started on one backend resumes on the other, and the losses of the
/// steps after the resume follow the uninterrupted CPU run (f32, within
/// 1e-4: two backends sum in different orders).
#[test]
fn a_checkpoint_resumes_across_backends() {
    let root = tmpdir("across");
    let data = synth_folder(&root, 4, 32, 8);
    let extra = ["CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=4"];
    let whole = root.join("whole");
    ok(&run(&args(&data, &whole, 2, &extra)));
    let expect = losses(&whole);
    for (first, then) in [("cpu", "cuda-host"), ("cuda-host", "cpu")] {
        let dir = root.join(format!("{first}-then-{then}"));
        let mut a = args(&data, &dir, 2, &extra);
        a.extend(["--device".into(), first.into(), "--max-steps".into(), "4".into()]);
        ok(&run(&a));
        let mut b = args(&data, &dir, 2, &extra);
        b.extend(["--device".into(), then.into()]);
        ok(&run(&b));
        let log = std::fs::read_to_string(dir.join("log.txt")).unwrap();
        assert!(log.contains("resuming from"), "{first} then {then}: {log}");
        let got = losses(&dir);
        assert_eq!(got.len(), expect.len(), "{first} then {then}: every step logged");
        for (i, want) in &expect {
            let (w, g): (f64, f64) = (want.parse().unwrap(), got[i].parse().unwrap());
            assert!((w - g).abs() <= 1e-4 * (1.0 + w.abs()), "{first} then {then}: step {i}: {g} vs {w}");
        }
    }
}

/// The CUDA executor is deterministic (no floating-point atomics; masks
/// from the CPU's Philox streams), so a run stopped mid-epoch and resumed
/// repeats an uninterrupted run bitwise, as on the CPU (here on the host
/// device; scripts/gpu-check.sh kills and resumes a run on a GPU).
#[test]
fn a_cuda_run_stopped_mid_epoch_resumes_bitwise() {
    let root = tmpdir("cuda-resume");
    let data = synth_folder(&root, 4, 32, 8);
    let extra = [
        "CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=3",
        "MODEL.TRUNK.VISION_TRANSFORMERS.DROPOUT_RATE=0.1",
        "--device",
        "cuda-host",
    ];
    let whole = root.join("whole");
    ok(&run(&args(&data, &whole, 2, &extra)));
    let expect = losses(&whole);
    assert_eq!(expect.len(), 16, "2 epochs of 8 steps");
    let stopped = root.join("stopped");
    let mut a = args(&data, &stopped, 2, &extra);
    a.extend(["--max-steps".to_string(), "5".to_string()]);
    ok(&run(&a));
    assert_eq!(losses(&stopped).len(), 5);
    ok(&run(&args(&data, &stopped, 2, &extra)));
    assert!(std::fs::read_to_string(stopped.join("log.txt")).unwrap().contains("resuming from"));
    assert_eq!(losses(&stopped), expect, "the resumed run's losses differ from the uninterrupted run's");
}

/// Standard output closed by its reader (`tessera train ... | head -1`) or
/// full (`> /dev/full`): the run trains on with its files, writes its final
/// checkpoint, and exits 0 without a panic; a full standard output is said
/// once on standard error, a closed pipe not at all.
#[test]
fn a_closed_or_full_standard_output_does_not_stop_the_run() {
    use std::io::{BufRead, BufReader};
    let root = tmpdir("closed-stdout");
    let data = synth_folder(&root, 2, 4, 1);
    // Not quiet: the step records go to standard output.
    let args = |dir: &Path| -> Vec<String> {
        let mut a = args(&data, dir, 3, &["DATA.TRAIN.BATCHSIZE_PER_REPLICA=2"]);
        a.retain(|x| x != "-q");
        a
    };
    // `| head -1`: read one record, then close the pipe.
    let piped = root.join("piped");
    let mut child = command().args(args(&piped)).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.contains("\"iteration\""), "{first}");
    let out = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success() && !e.contains("panicked") && !e.contains("standard output"), "{e}");
    assert!(records(&piped).len() >= 6, "every step still goes to stdout.json");
    assert!(piped.join("checkpoint.json").is_file(), "{e}");
    // `> /dev/full`.
    let full = root.join("full");
    let devfull = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let out = command().args(args(&full)).stdout(devfull).stderr(Stdio::piped()).output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success() && !e.contains("panicked"), "{e}");
    assert_eq!(e.matches("standard output failed").count(), 1, "{e}");
    assert!(full.join("checkpoint.json").is_file() && records(&full).len() >= 6, "{e}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// Copies the directory tree `from` to `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A test phase that fails (an unreadable validation image with
/// DATA.TEST.ERROR_ON_UNREADABLE_IMAGE) leaves its phase checkpoint with
/// the test pending. Rerun without testing (TEST_MODEL=false, or no meter:
/// METERS.name=''), the run skips that test phase with a warning naming it,
/// trains on, and ends with the weights of a run that never tested.
#[test]
fn a_pending_test_phase_is_skipped_with_a_warning_when_the_rerun_does_not_test() {
    let root = tmpdir("pending-test");
    let data = synth_folder(&root, 4, 8, 2);
    let class = std::fs::read_dir(data.join("val")).unwrap().flatten().next().unwrap().path();
    let bad = std::fs::read_dir(&class).unwrap().flatten().next().unwrap().path();
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\n this is not an image").unwrap();
    let never_tested = root.join("never-tested");
    ok(&run(&args(&data, &never_tested, 2, &["TEST_MODEL=false"])));
    let final_weights = |dir: &Path| {
        tessera_runtime::weights::read_safetensors(&dir.join("model_final_checkpoint_phase1").join("model.safetensors"))
            .unwrap()
    };

    let failed = root.join("failed");
    let o = run(&args(&data, &failed, 2, &["DATA.TEST.ERROR_ON_UNREADABLE_IMAGE=true"]));
    assert!(!o.status.success(), "the test phase reads an unreadable image: {}", text(&o));
    let bad_name = bad.file_name().unwrap().to_string_lossy().to_string();
    assert!(text(&o).contains(&bad_name), "{}", text(&o));
    let pending = tessera_engine::checkpoint::read(&failed.join("model_phase0")).unwrap();
    assert!(pending.engine.test_pending, "the checkpoint before the failed test phase records it as pending");
    let no_meter = root.join("no-meter");
    copy_tree(&failed, &no_meter);

    for (dir, extra, why) in
        [(&failed, "TEST_MODEL=false", "TEST_MODEL is off"), (&no_meter, "METERS.name=''", "no meter is configured")]
    {
        let o = run(&args(&data, dir, 2, &[extra]));
        let t = text(&o);
        assert!(o.status.success() && !t.contains("panicked"), "{extra}: {t}");
        assert!(
            t.contains("warning: the test phase after epoch 0 did not finish before checkpoint")
                && t.contains("model_phase0")
                && t.contains(why)
                && t.contains("skipped"),
            "{extra}: {t}"
        );
        assert_eq!(final_weights(dir), final_weights(&never_tested), "{extra}: the weights of a run without tests");
        // The skipped test phase stays recorded as not run.
        assert!(tessera_engine::checkpoint::read(&dir.join("model_phase0")).unwrap().engine.test_pending);
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// A learning rate far too high (1e3) makes the weights non-finite within a
/// few steps. No checkpoint is written from a non-finite state: the run
/// stops with an error naming the last good checkpoint, and that one, the
/// pointer's and every checkpoint on disk hold only finite values, so the
/// run can be recovered from them.
#[test]
fn a_diverging_run_writes_no_non_finite_checkpoint_and_names_a_finite_one() {
    let root = tmpdir("diverged");
    let data = synth_folder(&root, 4, 32, 8);
    let dir = root.join("run");
    let o = run(&args(
        &data,
        &dir,
        2,
        &["OPTIMIZER.param_schedulers.lr.start_value=1e3", "CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1"],
    ));
    let t = text(&o);
    assert!(!o.status.success() && !t.contains("panicked"), "{t}");
    assert!(t.contains("not finite") || t.contains("the loss is"), "{t}");
    let named = t
        .split("The last good checkpoint is ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .map(|line| Path::new(line.trim_end().trim_end_matches('.')).to_path_buf())
        .unwrap_or_else(|| panic!("no checkpoint named: {t}"));
    let finite = |ckpt: &Path| {
        for file in ["model.safetensors", "optimizer.safetensors"] {
            let tensors = tessera_runtime::weights::read_safetensors(&ckpt.join(file)).unwrap();
            let (bad, all): (usize, usize) = tensors
                .iter()
                .map(|x| (x.data.iter().filter(|v| !v.is_finite()).count(), x.data.len()))
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            assert_eq!(bad, 0, "{}: {bad} of {all} values are not finite", ckpt.join(file).display());
        }
    };
    finite(&named);
    let pointer: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("checkpoint.json")).unwrap()).unwrap();
    assert_eq!(dir.join(pointer["latest"].as_str().unwrap()), named, "the pointer names the last good checkpoint");
    let mut seen = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("model_") {
            finite(&e.path());
            seen += 1;
        }
    }
    assert!(seen >= 1);
    std::fs::remove_dir_all(&root).unwrap();
}

/// Two runs on one CHECKPOINT.DIR, started together: one locks the
/// directory and trains, the other is refused at once with the holder
/// named (pid, host, since when) and writes nothing there. The lock goes
/// when its run ends (here by SIGTERM).
#[test]
fn two_runs_on_one_checkpoint_directory_cannot_both_proceed() {
    let root = tmpdir("lock");
    let data = synth_folder(&root, 4, 32, 8);
    let dir = root.join("run");
    let a = args(&data, &dir, 20, &SLOW);
    let spawn = || command().args(&a).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut runs = [spawn(), spawn()];
    let start = std::time::Instant::now();
    let refused = loop {
        if let Some(i) = (0..2).find(|&i| runs[i].try_wait().unwrap().is_some()) {
            break i;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(120), "neither run was refused");
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let [r0, r1] = runs;
    let (refused_run, mut holder) = if refused == 0 { (r0, r1) } else { (r1, r0) };
    let out = refused_run.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    let host = tessera_engine::lock::hostname();
    assert!(
        err.contains("is in use by another run")
            && err.contains(&format!("process {} on host {host} (since ", holder.id()))
            && err.contains("tessera.lock"),
        "{err}"
    );
    assert!(holder.try_wait().unwrap().is_none(), "the holder trains on");
    wait_for_records(&mut holder, &dir, 2);
    let log = std::fs::read_to_string(dir.join("log.txt")).unwrap();
    assert_eq!(log.matches("training vision_transformer").count(), 1, "one run logs: {log}");
    assert!(dir.join("tessera.lock").is_file());
    let st = Command::new("kill").args(["-TERM", &holder.id().to_string()]).status().unwrap();
    assert!(st.success());
    let out = holder.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!dir.join("tessera.lock").exists(), "the lock goes with its run");
    std::fs::remove_dir_all(&root).unwrap();
}

/// A lock left by a process that is gone (killed outright) is taken over,
/// with a warning naming it, and removed when the run ends.
#[test]
fn a_stale_lock_of_a_dead_process_is_taken_over() {
    let root = tmpdir("stale-lock");
    let data = synth_folder(&root, 4, 8, 2);
    let dir = root.join("run");
    std::fs::create_dir_all(&dir).unwrap();
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let host = tessera_engine::lock::hostname();
    let lock = serde_json::json!({ "pid": pid, "host": host, "since": 0, "token": "left-behind" });
    std::fs::write(dir.join("tessera.lock"), lock.to_string()).unwrap();
    let o = run(&args(&data, &dir, 1, &["TEST_MODEL=false"]));
    ok(&o);
    let t = text(&o);
    assert!(
        t.contains("took over the stale lock")
            && t.contains(&format!("process {pid} on host {host} (since 1970-01-01 00:00:00 UTC)")),
        "{t}"
    );
    assert!(dir.join("model_final_checkpoint_phase0").is_dir());
    assert!(!dir.join("tessera.lock").exists(), "released at the end");
    std::fs::remove_dir_all(&root).unwrap();
}

/// A bit flipped in the newest checkpoint's model file (a disk or copy
/// error) fails its checksum: the resume warns, naming the checkpoint and
/// the file, falls back to the previous checkpoint, and ends bitwise where
/// an uninterrupted run does.
#[test]
fn a_flipped_bit_in_the_newest_checkpoint_falls_back_to_the_previous_one_and_resumes_bitwise() {
    let root = tmpdir("bitflip");
    let data = synth_folder(&root, 4, 32, 8);
    let extra = ["CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=3", "MODEL.TRUNK.VISION_TRANSFORMERS.DROPOUT_RATE=0.1"];
    let whole = root.join("whole");
    ok(&run(&args(&data, &whole, 2, &extra)));
    let stopped = root.join("stopped");
    let mut a = args(&data, &stopped, 2, &extra);
    a.extend(["--max-steps".to_string(), "7".to_string()]);
    ok(&run(&a));
    let (newest, previous) = (stopped.join("model_iteration7"), stopped.join("model_iteration6"));
    let model = newest.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let at = bytes.len() - 2; // a high mantissa bit of the last weight
    bytes[at] ^= 0x40;
    std::fs::write(&model, bytes).unwrap();

    let o = run(&args(&data, &stopped, 2, &extra));
    ok(&o);
    let t = text(&o);
    assert!(
        t.contains(&format!("warning: checkpoint {} is damaged (model.safetensors", newest.display()))
            && t.contains("checksum mismatch")
            && t.contains(&format!("resuming from {}", previous.display())),
        "{t}"
    );
    let log = std::fs::read_to_string(stopped.join("log.txt")).unwrap();
    assert!(log.contains(&format!("resuming from {} (epoch 0, iteration 6)", previous.display())), "{log}");
    assert_eq!(losses(&stopped), losses(&whole), "the resumed run's losses differ from the uninterrupted run's");
    let last = |dir: &Path| {
        tessera_runtime::weights::read_safetensors(&dir.join("model_final_checkpoint_phase1").join("model.safetensors"))
            .unwrap()
    };
    assert_eq!(last(&stopped), last(&whole), "the final weights differ from the uninterrupted run's");
    std::fs::remove_dir_all(&root).unwrap();
}

/// SIGKILL at every point of a checkpoint write (each file written, synced
/// or renamed: the engine's `TESSERA_CHECKPOINT_KILL_AT` hook), then a
/// flipped bit in the newest checkpoint the kill left: the resume falls
/// back to the newest intact one and ends bitwise where an uninterrupted
/// run does (issue 15).
#[test]
fn a_kill_at_every_point_of_a_checkpoint_write_then_a_flipped_bit_still_resumes_bitwise() {
    use std::os::unix::process::ExitStatusExt;
    let root = tmpdir("kill-points");
    let data = synth_folder(&root, 4, 32, 8);
    // Checkpoints at iterations 2, 4 and 6 of 8; the write of 6 is killed.
    let extra = [
        "CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=2",
        "MODEL.TRUNK.VISION_TRANSFORMERS.DROPOUT_RATE=0.1",
        "TEST_MODEL=false",
    ];
    let whole = root.join("whole");
    ok(&run(&args(&data, &whole, 1, &extra)));
    let final_weights = |dir: &Path| {
        let file = dir.join("model_final_checkpoint_phase0").join("model.safetensors");
        tessera_runtime::weights::read_safetensors(&file).unwrap()
    };
    let mut points = 0;
    for j in 1.. {
        let dir = root.join(format!("killed-at-{j}"));
        let o = command()
            .args(args(&data, &dir, 1, &extra))
            .env("TESSERA_CHECKPOINT_KILL_AT", format!("model_iteration6:{j}"))
            .output()
            .unwrap();
        if o.status.success() {
            break; // past the write's last point
        }
        assert_eq!(o.status.signal(), Some(9), "point {j}: {}", text(&o));
        points += 1;
        // The checkpoint a resume would take (the pointer's: 4 until the
        // pointer names 6) gets a flipped bit; the newest intact one is then
        // 6 if the kill left it in place, else the newest before it.
        let newest = tessera_engine::checkpoint::resume_point(&dir).unwrap().unwrap().path;
        let intact = [6, 4, 2]
            .map(|i| dir.join(format!("model_iteration{i}")))
            .into_iter()
            .find(|p| p.is_dir() && *p != newest)
            .unwrap();
        let model = newest.join("model.safetensors");
        let mut bytes = std::fs::read(&model).unwrap();
        let at = bytes.len() - 2;
        bytes[at] ^= 0x40;
        std::fs::write(&model, bytes).unwrap();

        let o = run(&args(&data, &dir, 1, &extra));
        ok(&o);
        let t = text(&o);
        assert!(t.contains(&format!("warning: checkpoint {} is damaged", newest.display())), "point {j}: {t}");
        let log = std::fs::read_to_string(dir.join("log.txt")).unwrap();
        assert!(log.contains(&format!("resuming from {} (", intact.display())), "point {j}: {log}");
        assert_eq!(losses(&dir), losses(&whole), "point {j}: the resumed run's losses differ");
        assert_eq!(final_weights(&dir), final_weights(&whole), "point {j}: the final weights differ");
    }
    // Every file of the write, its fsync and rename, the directory's and
    // the pointer's: 11 points.
    assert_eq!(points, 11);
    std::fs::remove_dir_all(&root).unwrap();
}

/// `tessera train` limited to `limit` bytes of address space (`ulimit -v`),
/// so that a step too big for memory fails the same on any machine, and a
/// regression (an allocation that is not checked first) is an allocation
/// failure here, never the machine's memory used up.
fn run_limited(args: &[String], limit: u64) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = command();
    cmd.args(args);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(move || {
            let l = libc::rlimit { rlim_cur: limit, rlim_max: limit };
            if libc::setrlimit(libc::RLIMIT_AS, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

/// A model or a transform too big for memory is refused before anything is
/// allocated, with the step's peak, what is available and what would fit
/// (issue 15, defect 8).
#[test]
fn a_step_too_big_for_memory_is_refused_before_it_allocates() {
    let root = tmpdir("oom");
    let data = synth_folder(&root, 4, 8, 2);
    let limit = 6u64 << 30;
    // A ViT of 32768 wide with MLPs of 131072: hundreds of GB of parameters.
    let wide = [
        "MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM=32768",
        "MODEL.TRUNK.VISION_TRANSFORMERS.MLP_DIM=131072",
        "MODEL.TRUNK.VISION_TRANSFORMERS.NUM_HEADS=8",
        "MODEL.HEAD.PARAMS=[[mlp, {dims: [32768, 4]}]]",
        "TEST_MODEL=false",
    ];
    let o = run_limited(&args(&data, &root.join("wide"), 1, &wide), limit);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("needs") && t.contains("at its peak"), "{t}");
    assert!(t.contains("is available (the address-space limit"), "{t}");
    assert!(t.contains("not even batch 1 fits"), "{t}");
    assert!(t.contains("parameters in"), "{t}");
    assert!(!t.contains("memory allocation of"), "{t}");

    // A batch too big for memory names the largest one that fits.
    let o = run_limited(
        &args(
            &data,
            &root.join("batch"),
            1,
            &["DATA.TRAIN.BATCHSIZE_PER_REPLICA=100000", "DATA.TRAIN.DROP_LAST=false", "TEST_MODEL=false"],
        ),
        limit,
    );
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("the largest batch that fits is"), "{t}");
    assert!(t.contains("DATA.TRAIN.BATCHSIZE_PER_REPLICA="), "{t}");

    // A parameter of [200000000, 10] (8 GB) in a model file.
    let models = root.join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::write(
        models.join("huge.tsr"),
        "head huge_head(x: [B, D], dims: list) {\n    param table: [200000000, 10] = zeros\n    param w: [dims[1], D] = zeros\n    return linear(x, w)\n}\n",
    )
    .unwrap();
    let mut a =
        args(&data, &root.join("huge"), 1, &["MODEL.HEAD.PARAMS=[[huge_head, {dims: [192, 4]}]]", "TEST_MODEL=false"]);
    a.extend(["--models".to_string(), models.display().to_string()]);
    let o = run_limited(&a, limit);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("at its peak"), "{t}");
    assert!(t.contains("`heads.0.table` [200000000,10] (2000000000 parameters)"), "{t}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// Transform sizes and RandAugment's num_layers are bounded, with an error
/// naming the key and the bound (issue 15, defects 8 and 9).
#[test]
fn transform_sizes_and_rand_augment_layers_are_bounded() {
    let root = tmpdir("transforms");
    let data = synth_folder(&root, 4, 8, 2);
    let crop = "DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 100000}, {name: ToTensor}]";
    let o = run(&args(&data, &root.join("crop"), 1, &[crop, "TEST_MODEL=false"]));
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("RandomResizedCrop") && t.contains("key `size`"), "{t}");
    assert!(t.contains("above the bound of 16384 pixels per side"), "{t}");
    let ra = "DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 32}, {name: RandAugment, num_layers: 1000000}, {name: ToTensor}]";
    let o = run(&args(&data, &root.join("ra"), 1, &[ra, "TEST_MODEL=false"]));
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("RandAugment") && t.contains("key `num_layers`"), "{t}");
    assert!(t.contains("above the bound of 100"), "{t}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// Only regular files are read as images: a FIFO named `x.png` (which would
/// block the read forever) and a symlink to /dev/zero named `y.png` (read
/// until memory runs out) are unreadable samples, counted and named like a
/// corrupt image, and the run finishes (issue 15, defect 9).
#[test]
fn a_fifo_or_a_device_named_like_an_image_is_an_unreadable_sample_not_a_hang() {
    let root = tmpdir("special");
    let data = synth_folder(&root, 4, 8, 2);
    let class = data.join("train").join("circle");
    assert!(Command::new("mkfifo").arg(class.join("x.png")).status().unwrap().success());
    std::os::unix::fs::symlink("/dev/zero", class.join("y.png")).unwrap();
    let ckpt = root.join("run");
    let mut child = command()
        .args(args(&data, &ckpt, 1, &["TEST_MODEL=false", "DATA.TRAIN.BATCHSIZE_PER_REPLICA=8"]))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(300) {
            child.kill().unwrap();
            panic!("the run hangs on a FIFO or a device named like an image");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let log = std::fs::read_to_string(ckpt.join("log.txt")).unwrap();
    assert!(log.contains("2 unreadable image(s) replaced by gray ones this epoch"), "{log}");
    assert!(log.contains("x.png") && log.contains("a FIFO (named pipe)"), "{log}");
    assert!(log.contains("y.png") && log.contains("a character device"), "{log}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// CHECKPOINT.KEEP_LAST_ITERATION_CHECKPOINTS=2 with a checkpoint every
/// iteration: only the two newest iteration checkpoints stay (phase ones
/// all stay), the pointer names one that exists, and the run resumes from
/// it; 0 is refused naming the key.
#[test]
fn only_the_newest_iteration_checkpoints_are_kept_when_asked() {
    let root = tmpdir("prune");
    let data = synth_folder(&root, 4, 32, 8);
    let dir = root.join("run");
    let extra = ["CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1", "CHECKPOINT.KEEP_LAST_ITERATION_CHECKPOINTS=2"];
    let mut a = args(&data, &dir, 2, &extra);
    a.extend(["--max-steps".to_string(), "10".to_string()]);
    ok(&run(&a));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("model_"))
        .collect();
    names.sort();
    // 128 images, batch 16: 8 steps per epoch, phase 0's checkpoint at 8.
    assert_eq!(names, ["model_iteration10", "model_iteration9", "model_phase0"], "{names:?}");
    let pointer: Value = serde_json::from_slice(&std::fs::read(dir.join("checkpoint.json")).unwrap()).unwrap();
    assert_eq!(pointer["latest"], "model_iteration10");
    let o = run(&args(&data, &dir, 2, &extra));
    ok(&o);
    let log = std::fs::read_to_string(dir.join("log.txt")).unwrap();
    assert!(log.contains("resuming from") && log.contains("iteration 10)"), "{log}");
    assert!(log.contains("KEEP_LAST_ITERATION_CHECKPOINTS=2"), "{log}");
    let o = run(&args(&data, &root.join("zero"), 1, &["CHECKPOINT.KEEP_LAST_ITERATION_CHECKPOINTS=0"]));
    assert!(
        !o.status.success() && text(&o).contains("`CHECKPOINT.KEEP_LAST_ITERATION_CHECKPOINTS` is 0"),
        "{}",
        text(&o)
    );
    std::fs::remove_dir_all(&root).unwrap();
}

/// TEST_ONLY=True runs the test phase alone on MODEL.WEIGHTS_INIT's weights
/// (VISSL): no training step, no checkpoint, the test record of a trained
/// run's final weights equal to that run's own last test phase; it needs
/// weights to evaluate. A finished run ends with one line on stderr (piped):
/// its last phase's accuracy, the time and the final checkpoint.
#[test]
fn test_only_evaluates_a_checkpoint_without_training() {
    let root = tmpdir("test-only");
    let data = synth_folder(&root, 4, 32, 8);
    let trained = root.join("trained");
    let o = run(&args(&data, &trained, 1, &[]));
    ok(&o);
    let t = text(&o);
    let final_ckpt = trained.join("model_final_checkpoint_phase0");
    assert!(
        t.contains("tessera train: finished in ")
            && t.contains("epoch 1 val top-1 ")
            && t.contains(&format!("final checkpoint {}", final_ckpt.display())),
        "{t}"
    );
    // stdout.json has VISSL's record keys (its log parsers read them).
    let r = &records(&trained)[0];
    for k in ["Rank", "ep", "iter", "lr", "loss", "btime(ms)", "eta", "peak_mem(M)", "weight_decay"] {
        assert!(r.get(k).is_some(), "{k} missing from {r}");
    }
    assert_eq!((r["Rank"].as_u64(), r["ep"].as_u64(), r["iter"].as_u64()), (Some(0), Some(0), Some(1)), "{r}");
    let eta = r["eta"].as_str().unwrap();
    assert!(eta.split(':').count() == 3 && eta.ends_with(|c: char| c.is_ascii_digit()), "{eta}");
    assert!(r["peak_mem(M)"].as_u64().unwrap() > 0 && r["weight_decay"].as_f64().is_some(), "{r}");
    // The run folder tells its story: the command at the top of log.txt,
    // the resolved config beside it, which loads back as the same config.
    let log = std::fs::read_to_string(trained.join("log.txt")).unwrap();
    assert!(
        log.lines().next().unwrap().contains("tessera train config=quickstart/vit_tiny DATA.TRAIN.DATA_PATHS="),
        "{log}"
    );
    let curves = std::fs::read_to_string(trained.join("curves.svg")).unwrap();
    assert!(curves.starts_with("<svg") && curves.contains("val top-1 %"), "{curves}");
    let yaml = trained.join("config.yaml");
    let o = command().args(["config", "show", &format!("config={}", yaml.display())]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        std::fs::read_to_string(&yaml).unwrap(),
        "config.yaml loads back to itself"
    );
    assert!(std::fs::read_to_string(&yaml).unwrap().contains("BATCHSIZE_PER_REPLICA: 16"));
    let last_test = |dir: &Path| -> Value {
        let text = std::fs::read_to_string(dir.join("metrics.json")).unwrap();
        let r: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        r.into_iter().rev().find(|r| r.get("test_accuracy_list_meter").is_some()).expect("a test record")
    };
    let eval = root.join("eval");
    let init = format!("MODEL.WEIGHTS_INIT.PARAMS_FILE={}", final_ckpt.display());
    let o = run(&args(&data, &eval, 1, &["TEST_ONLY=True", &init]));
    ok(&o);
    assert!(text(&o).contains("tessera train: TEST_ONLY: epoch 1 val top-1 "), "{}", text(&o));
    assert_eq!(
        last_test(&eval)["test_accuracy_list_meter"],
        last_test(&trained)["test_accuracy_list_meter"],
        "the same weights on the same test set"
    );
    let names: Vec<String> =
        std::fs::read_dir(&eval).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.starts_with("model_") || n == "checkpoint.json"), "{names:?}");
    assert!(records(&eval).is_empty(), "no training step was logged");
    // Nothing to evaluate, or no test phase to run: refused, naming the key.
    let o = run(&args(&data, &root.join("none"), 1, &["TEST_ONLY=True"]));
    assert!(!o.status.success() && text(&o).contains("`TEST_ONLY` evaluates trained weights"), "{}", text(&o));
    let o = run(&args(&data, &root.join("off"), 1, &["TEST_ONLY=True", "TEST_MODEL=False", &init]));
    assert!(!o.status.success() && text(&o).contains("needs TEST_MODEL=True"), "{}", text(&o));
    std::fs::remove_dir_all(&root).unwrap();
}

/// An empty CHECKPOINT.DIR is refused naming the key (it trained in the
/// working directory and then reported a write failure that had not happened).
#[test]
fn an_empty_checkpoint_dir_is_refused() {
    let root = tmpdir("empty-dir");
    let data = synth_folder(&root, 4, 32, 8);
    let o = run(&args(&data, &root.join("run"), 1, &["CHECKPOINT.DIR="]));
    assert!(!o.status.success() && text(&o).contains("`CHECKPOINT.DIR` is empty"), "{}", text(&o));
    assert!(!root.join("run").exists());
    std::fs::remove_dir_all(&root).unwrap();
}

/// A MODEL.WEIGHTS_INIT file none of whose tensors fits the model is an
/// error naming the file, the key and the renaming keys, as in `tessera
/// infer`, not a line in log.txt and a run from random weights (issue 15,
/// defect 11).
#[test]
fn weights_init_matching_no_tensor_is_refused() {
    let root = tmpdir("init-none");
    let data = synth_folder(&root, 4, 8, 2);
    let file = root.join("other.safetensors");
    let tensors = [tessera_runtime::weights::NamedTensor::new("encoder.layer.0.weight", vec![2, 2], vec![0.0; 4])];
    tessera_runtime::weights::write_safetensors(&file, &tensors, &BTreeMap::new()).unwrap();
    let init = format!("MODEL.WEIGHTS_INIT.PARAMS_FILE={}", file.display());
    let o = run(&args(&data, &root.join("run"), 1, &["TEST_MODEL=false", &init]));
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    let named = format!("MODEL.WEIGHTS_INIT.PARAMS_FILE {}: none of the file's tensors matches", file.display());
    for p in [
        named.as_str(),
        "(the file: `encoder.layer.0.weight` ...; the model: `trunk.",
        "REMOVE_PREFIX / APPEND_PREFIX / SKIP_LAYERS",
    ] {
        assert!(t.contains(p), "{t:?} lacks {p:?}");
    }
    // The prefixes applied are named: here APPEND_PREFIX makes `trunk.trunk.…`.
    let weights = root.join("first.safetensors");
    let model = [tessera_runtime::weights::NamedTensor::new("trunk.cls_token", vec![1, 1, 64], vec![0.0; 64])];
    tessera_runtime::weights::write_safetensors(&weights, &model, &BTreeMap::new()).unwrap();
    let init = format!("MODEL.WEIGHTS_INIT.PARAMS_FILE={}", weights.display());
    let o = run(&args(
        &data,
        &root.join("run2"),
        1,
        &["TEST_MODEL=false", &init, "MODEL.WEIGHTS_INIT.APPEND_PREFIX=trunk."],
    ));
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("after APPEND_PREFIX `trunk.` was put in front of them"), "{t}");
    assert!(t.contains("`trunk.trunk.cls_token`"), "{t}");
    // Without the prefix the one tensor loads and the run trains.
    ok(&run(&args(&data, &root.join("run3"), 1, &["TEST_MODEL=false", &init])));
    std::fs::remove_dir_all(&root).unwrap();
}

/// `tessera train` refuses a model with no trainable parameter reaching the
/// loss, and values that mean nothing, before it reads any data (issue 15,
/// defects 10 and 11).
#[test]
fn train_refuses_a_frozen_model_and_meaningless_values_before_training() {
    let root = tmpdir("refused-values");
    let data = synth_folder(&root, 4, 8, 2);
    let frozen = [
        "MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON=True",
        "MODEL.FEATURE_EVAL_SETTINGS.FREEZE_TRUNK_AND_HEAD=True",
        "TEST_MODEL=false",
    ];
    let o = run(&args(&data, &root.join("frozen"), 1, &frozen));
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("no trainable parameter reaches the loss"), "{t}");
    assert!(t.contains("by MODEL.FEATURE_EVAL_SETTINGS.FREEZE_TRUNK_AND_HEAD"), "{t}");
    assert!(!t.contains("unknown input"), "{t}");
    for (value, part) in [
        (
            "METERS.accuracy_list_meter.topk_values=[1, 5]",
            "`METERS.accuracy_list_meter.topk_values.1` is 5, above the 4 classes",
        ),
        ("OPTIMIZER.param_schedulers.lr.end_value=-1", "`OPTIMIZER.param_schedulers.lr.end_value`: is -1"),
        ("MODEL.TRUNK.VISION_TRANSFORMERS.CLASSIFIER=cls", "valid values: `token`"),
    ] {
        let o = run(&args(&data, &root.join("value"), 1, &["TEST_MODEL=false", value]));
        let t = text(&o);
        assert!(!o.status.success() && t.contains(part), "{value}: {t}");
        assert!(records(&root.join("value")).is_empty(), "{value}: it trained");
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// HOOKS.PERF_STATS as VISSL's hooks report it: the average batch time and
/// the step's breakdown in log.txt every PERF_STAT_FREQUENCY batches, and
/// the rolling batch time and ETA of the last ROLLING_BTIME_FREQ batches in
/// each logged step record once that many have run.
#[test]
fn perf_stats_are_logged_as_asked() {
    let root = tmpdir("perf");
    let data = synth_folder(&root, 4, 8, 4);
    let ckpt = root.join("run");
    let perf = [
        "HOOKS.PERF_STATS.MONITOR_PERF_STATS=true",
        "HOOKS.PERF_STATS.PERF_STAT_FREQUENCY=2",
        "HOOKS.PERF_STATS.ROLLING_BTIME_FREQ=2",
    ];
    ok(&run(&args(&data, &ckpt, 2, &perf)));
    let log = std::fs::read_to_string(ckpt.join("log.txt")).unwrap();
    // 2 steps an epoch: one report per epoch, each after its 2 batches.
    assert_eq!(log.matches("Average train batch time (ms) for 2 batches: ").count(), 2, "{log}");
    for section in ["read_sample", "train_step", "meters"] {
        assert_eq!(log.matches(&format!("  {section} ")).count(), 2, "{section}: {log}");
    }
    let recs = records(&ckpt);
    assert_eq!(recs.len(), 4);
    // The first step has one batch time only; every later one has two.
    assert!(recs[0].get("btime(2iters)(ms)").is_none());
    for r in &recs[1..] {
        assert!(r["btime(2iters)(ms)"].is_u64() && r["rolling_eta"].is_string(), "{r}");
    }
    // Without MONITOR_PERF_STATS nothing is reported.
    let quiet = root.join("quiet");
    ok(&run(&args(&data, &quiet, 1, &[])));
    assert!(!std::fs::read_to_string(quiet.join("log.txt")).unwrap().contains("Average train batch time"));
    std::fs::remove_dir_all(&root).unwrap();
}
