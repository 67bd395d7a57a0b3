//! Realisations: what content-addressed derivations (experimental
//! `ca-derivations`) resolved to. Nix keeps them in two extra tables, made
//! only in stores that have used the feature; the merge carries them over
//! for the lower paths it registers, matched by (drvPath, outputName).

use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

/// Whether `schema` (main, lower0…) has a table called `name`.
pub fn has_table(tx: &Connection, schema: &str, name: &str) -> rusqlite::Result<bool> {
    tx.query_row(
        &format!("select 1 from {schema}.sqlite_master where type = 'table' and name = ?1"),
        [name],
        |_| Ok(()),
    )
    .optional()
    .map(|o| o.is_some())
}

/// Makes the merged database's CA tables, as the lower's Nix made them
/// (statement for statement, so that the Nix reading the merged store finds
/// what it expects), along with the `ca-schema` version file next to it.
pub fn ensure_tables(
    tx: &Connection,
    lower_alias: &str,
    lower_db_dir: &Path,
    upper_db_dir: &Path,
) -> rusqlite::Result<()> {
    if has_table(tx, "main", "Realisations")? {
        return Ok(());
    }
    let statements = tx
        .prepare(&format!(
            "select sql from {lower_alias}.sqlite_master
             where sql is not null
               and (tbl_name in ('Realisations', 'RealisationsRefs')
                    or (type = 'trigger' and name = 'DeleteSelfRefsViaRealisations'))
             order by case type when 'table' then 0 when 'index' then 1 else 2 end,
                      case tbl_name when 'Realisations' then 0 else 1 end"
        ))?
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    for sql in statements {
        tx.execute_batch(&sql)?;
    }
    let (from, to) = (
        lower_db_dir.join("ca-schema"),
        upper_db_dir.join("ca-schema"),
    );
    if !to.exists() {
        if let Err(e) = std::fs::copy(&from, &to) {
            tracing::warn!(file = %from.display(), error = %e, "could not copy the CA schema version file");
        }
    }
    Ok(())
}

/// Frees the realisations of paths about to be removed from the references
/// between realisations (`on delete restrict`), so the removal can go ahead.
pub fn release_removed(tx: &Connection) -> rusqlite::Result<()> {
    if !has_table(tx, "main", "RealisationsRefs")? {
        return Ok(());
    }
    tx.execute_batch(
        "delete from main.RealisationsRefs
         where referrer in (select id from main.Realisations where outputPath in (select id from temp.removed))
            or realisationReference in (select id from main.Realisations where outputPath in (select id from temp.removed));",
    )
}

/// Copies the lower's realisations whose output path this sync added.
pub fn add(tx: &Connection, alias: &str, lower_id: i64) -> rusqlite::Result<()> {
    tx.execute(
        &format!(
            "insert into main.Realisations (drvPath, outputName, outputPath, signatures)
             select r.drvPath, r.outputName, m.id, r.signatures from {alias}.Realisations r
             join {alias}.ValidPaths v on v.id = r.outputPath
             join temp.added a on a.path = v.path and a.lower = ?1
             join main.ValidPaths m on m.path = v.path
             where not exists (select 1 from main.Realisations x
                               where x.drvPath = r.drvPath and x.outputName = r.outputName)"
        ),
        [lower_id],
    )?;
    if !has_table(tx, alias, "RealisationsRefs")? {
        return Ok(());
    }
    tx.execute(
        &format!(
            "insert into main.RealisationsRefs (referrer, realisationReference)
             select mr.id, md.id from {alias}.RealisationsRefs rr
             join {alias}.Realisations r1 on r1.id = rr.referrer
             join {alias}.Realisations r2 on r2.id = rr.realisationReference
             join {alias}.ValidPaths v on v.id = r1.outputPath
             join temp.added a on a.path = v.path and a.lower = ?1
             join main.Realisations mr on mr.drvPath = r1.drvPath and mr.outputName = r1.outputName
             join main.Realisations md on md.drvPath = r2.drvPath and md.outputName = r2.outputName"
        ),
        [lower_id],
    )?;
    Ok(())
}
