//! One module per `tune` verb; each has clap `Args` and a `run` function.

pub mod bench;
pub mod cat;
pub mod cp;
pub mod download;
pub mod ls;
pub mod run;
pub mod selfcheck;
pub mod validate;
