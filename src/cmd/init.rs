//! `nixfs-layer init --upper DIR`

use crate::cli::InitArgs;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::layer::Upper;
use crate::pathdb;

pub fn run(args: &InitArgs) -> Result<()> {
    let config = Config::load(args.config.config.as_deref())?;
    let dir =
        args.upper.clone().or(config.upper).ok_or_else(|| {
            Error::Usage("init needs --upper DIR (or `upper` in the config)".into())
        })?;
    let existed = Upper::open(&dir).is_ok();
    let upper = Upper::init(&dir)?;
    pathdb::create(&upper.db())?;
    let conn = pathdb::open(&upper.db())?;
    pathdb::pin::ensure(&conn, &upper, &upper.store())?;
    tracing::info!(upper = %upper.dir().display(), "upper ready");
    if args.json {
        super::print_json(&serde_json::json!({
            "format": 1,
            "upper": upper.dir(),
            "created": !existed,
        }));
    } else if existed {
        println!("upper {} is initialised already", upper.dir().display());
    } else {
        println!(
            "initialised upper {}: store/, work/, var/ with a fresh Nix database, nixfs-layer/",
            upper.dir().display()
        );
    }
    Ok(())
}
