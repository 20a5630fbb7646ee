use anyhow::Result;
pub fn run(_runs: usize, _seconds: f64) -> Result<()> {
    anyhow::bail!("not yet")
}
