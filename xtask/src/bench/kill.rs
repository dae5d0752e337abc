//! Bench section `kill` (being written; see the module list in bench/mod.rs).

use anyhow::{Result, bail};

use super::{Ctx, Section};

pub async fn run(_ctx: &Ctx) -> Result<Section> {
    bail!("section kill is not written yet")
}
