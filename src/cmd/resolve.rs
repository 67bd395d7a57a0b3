//! `nixfs-layer resolve FLAKEREF [--json]`: the tree's resolver, once.

use serde::Serialize;

use crate::cli::ResolveArgs;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::flakefs::daemon;
use crate::flakefs::names::FlakeRef;
use crate::flakefs::policy::Caller;
use crate::flakefs::resolver::How;

use super::resolve_target;

#[derive(Serialize)]
struct Answer<'a> {
    format: u32,
    #[serde(rename = "ref")]
    reference: &'a str,
    path: String,
    how: How,
    locked: bool,
    /// The index entry, when a lower published the reference: its locked
    /// form and time; `null` otherwise.
    published: Option<&'a crate::published::Entry>,
}

pub fn run(args: &ResolveArgs) -> Result<()> {
    let config = Config::load(args.target.config.config.as_deref())?;
    let target = resolve_target(args.target.target.as_deref(), &config)?;
    let r = FlakeRef::parse(&args.reference)?;
    let resolver = daemon::resolver(&target, &config.flakefs)?;
    let res = resolver
        .resolve(&r, &Caller::current())
        .map_err(Error::Resolve)?;
    if args.json {
        let a = Answer {
            format: 1,
            reference: &r.text,
            path: res.path.display().to_string(),
            how: res.how,
            locked: res.locked,
            published: res.published.as_ref(),
        };
        println!("{}", serde_json::to_string(&a).expect("answer serialises"));
    } else {
        println!("{}", res.path.display());
    }
    Ok(())
}
