-- nixfs-layer's own tables inside the merged Nix database.
--
-- They live in the same file as Nix's tables so that one SQLite transaction
-- covers both, and so that the triggers below run inside every transaction
-- Nix itself makes: when Nix registers a path (a build, `nix-store --add`) it
-- is recorded as coming from the upper; when Nix invalidates a path (garbage
-- collection, `nix-store --delete`) its provenance goes with it. Nix ignores
-- tables it does not know.

-- Lowers this upper has been stacked on. `priority` is the position in the
-- current stack (0 = first --lower, on top); NULL once a lower is no longer
-- part of the stack.
create table if not exists NixfsLayerLower (
    id          integer primary key autoincrement not null,
    dir         text unique not null,
    priority    integer,
    fingerprint text,    -- its identity (dev/inode of dir and store/), database files and store dir stamps at the last sync
    syncedAt    integer  -- unix time of the last sync
);

-- Which layer every valid path of the merged database comes from:
-- 0 = the upper (registered through the merged store), otherwise
-- NixfsLayerLower.id.
create table if not exists NixfsLayerOrigin (
    path   text primary key not null,
    layer  integer not null
) without rowid;

-- No index on `layer`: the few queries by layer scan the table anyway, and
-- every sync would pay for keeping one (a random page per changed path).
drop index if exists NixfsLayerOriginLayer;

-- The valid paths of each lower as of the last sync, whether or not the
-- merged view takes them from that lower.
create table if not exists NixfsLayerLowerPath (
    lower    integer not null,
    path     text not null,
    narSize  integer,
    primary key (lower, path)
) without rowid;

-- Looked up by path through the primary key, one lower at a time (there
-- are few), so no second index to keep up to date on every sync.
drop index if exists NixfsLayerLowerPathPath;

-- Paths the merged store takes from a lower whose store entry has vanished
-- from that lower while the lower's database still lists them (someone
-- removed it behind the database): found when the lower's store directory
-- changed, looked at again by every sync until the entry is back or the
-- path is no longer the lower's.
create table if not exists NixfsLayerVanished (
    lower  integer not null,
    path   text not null,
    primary key (lower, path)
) without rowid;

create trigger if not exists NixfsLayerOriginOnInsert after insert on ValidPaths
  begin
    insert or ignore into NixfsLayerOrigin (path, layer) values (new.path, 0);
  end;

create trigger if not exists NixfsLayerOriginOnDelete after delete on ValidPaths
  begin
    delete from NixfsLayerOrigin where path = old.path;
  end;

-- How many valid paths the lowers provide (rows of NixfsLayerOrigin with
-- layer > 0): one row, kept by the triggers below inside every transaction
-- that changes provenance (Nix's too), so that a sync with nothing to do
-- reports it without reading a row per path. A database made before this
-- table gets its row, counted once, when this tool next opens it
-- (src/pathdb/mod.rs).
create table if not exists NixfsLayerCounts (
    provided integer not null
);

create trigger if not exists NixfsLayerCountOnInsert after insert on NixfsLayerOrigin
  when new.layer > 0
  begin
    update NixfsLayerCounts set provided = provided + 1;
  end;

create trigger if not exists NixfsLayerCountOnDelete after delete on NixfsLayerOrigin
  when old.layer > 0
  begin
    update NixfsLayerCounts set provided = provided - 1;
  end;

create trigger if not exists NixfsLayerCountOnUpdate after update of layer on NixfsLayerOrigin
  when (old.layer > 0) != (new.layer > 0)
  begin
    update NixfsLayerCounts set provided = provided + (new.layer > 0) - (old.layer > 0);
  end;

-- The journal of the upper's own registrations (UPPER/nixfs-layer/journal.sqlite,
-- src/pathdb/journal.rs) copies the upper's rows out of this file, so that
-- `verify --repair` can rebuild a damaged merged database without losing
-- their deriver, signatures, registration time or CA field. New rows are
-- found by id (ids only grow); rows changed in place (new signatures, a
-- lower path adopted by the upper) are listed here by these triggers, inside
-- the transaction that changes them, until the journal has copied them.
create table if not exists NixfsLayerJournalDirty (
    path text primary key not null
) without rowid;

create trigger if not exists NixfsLayerJournalOnUpdate after update on ValidPaths
  when exists (select 1 from NixfsLayerOrigin where path = new.path and layer = 0)
  begin
    insert or ignore into NixfsLayerJournalDirty (path) values (new.path);
  end;

create trigger if not exists NixfsLayerJournalOnAdopt after update of layer on NixfsLayerOrigin
  when new.layer = 0
  begin
    insert or ignore into NixfsLayerJournalDirty (path) values (new.path);
  end;

-- One random token per merged database file: a journal made from another
-- file (a rebuilt or restored one, where ids start over) starts afresh.
create table if not exists NixfsLayerDbId (
    token text not null
);
