//! Standard output and standard error that never panic. `println!` panics
//! when its write fails (`tessera train ... | head -1` closes the pipe;
//! `> /dev/full` fills it), which would lose the work since the last
//! checkpoint. Here a failed write turns that stream off for the rest of
//! the process: the run goes on with its files (log.txt, stdout.json,
//! checkpoints) as usual. A closed pipe ends output quietly (its reader has
//! what it wanted); any other failure of standard output is said once on
//! standard error. A failing standard error has nowhere to be reported.

use std::fmt;
use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};

static STDOUT_OFF: AtomicBool = AtomicBool::new(false);
static STDERR_OFF: AtomicBool = AtomicBool::new(false);

/// Writes to standard output; false once it is off.
pub fn out(args: fmt::Arguments) -> bool {
    if STDOUT_OFF.load(Ordering::Relaxed) {
        return false;
    }
    let mut o = std::io::stdout().lock();
    match o.write_fmt(args).and_then(|_| o.flush()) {
        Ok(()) => true,
        Err(e) => {
            STDOUT_OFF.store(true, Ordering::Relaxed);
            if e.kind() != ErrorKind::BrokenPipe {
                err(format_args!(
                    "tessera: standard output failed ({e}); output to it is off, the run's files go on\n"
                ));
            }
            false
        }
    }
}

/// Writes to standard error (silently nothing once it has failed).
pub fn err(args: fmt::Arguments) {
    if STDERR_OFF.load(Ordering::Relaxed) {
        return;
    }
    let mut e = std::io::stderr().lock();
    if e.write_fmt(args).and_then(|_| e.flush()).is_err() {
        STDERR_OFF.store(true, Ordering::Relaxed);
    }
}

/// `println!` that never panics (see the module).
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => { $crate::console::out(format_args!("{}\n", format_args!($($t)*))) };
}

/// `eprintln!` that never panics.
#[macro_export]
macro_rules! errln {
    () => { $crate::console::err(format_args!("\n")) };
    ($($t:tt)*) => { $crate::console::err(format_args!("{}\n", format_args!($($t)*))) };
}

/// `eprint!` that never panics.
#[macro_export]
macro_rules! err {
    ($($t:tt)*) => { $crate::console::err(format_args!($($t)*)) };
}
