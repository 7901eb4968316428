// The model files and configs are embedded with include_dir; rebuild when any
// file under them changes, is added or is removed.
fn main() {
    println!("cargo:rerun-if-changed=../models");
    println!("cargo:rerun-if-changed=../configs");
    println!("cargo:rerun-if-changed=../grammar");
}
