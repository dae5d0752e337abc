//! Bench section `reload` (being written; see the module list in bench/mod.rs).

use anyhow::{Result, bail};

use super::{Ctx, Section};

pub async fn run(_ctx: &Ctx) -> Result<Section> {
    bail!("section reload is not written yet")
}
