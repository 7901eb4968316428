//! (In progress.)

use super::super::lower::Lowering;
use tessera_plan::Op;

pub fn lower(_l: &mut Lowering, _k: usize, op: &Op) -> Result<(), String> {
    Err(format!("{} is not implemented by the CUDA backend yet", op.name()))
}
