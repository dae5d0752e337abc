//! Bench section `peers` (being written; see the module list in bench/mod.rs).

use anyhow::{Result, bail};

use super::{Ctx, Section};

pub async fn run(_ctx: &Ctx) -> Result<Section> {
    bail!("section peers is not written yet")
}
