//! `qinspect map`.
use super::CmdResult;
use std::path::PathBuf;
/// Arguments of `qinspect map`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The image.
    pub image: PathBuf,
}
/// Run.
pub fn run(_a: Args) -> CmdResult {
    Ok(0)
}
