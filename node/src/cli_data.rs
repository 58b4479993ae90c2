//! `sanctum-node data check`: a data steward's check of a table against a schema file, offline
//! and before any plan. It streams the whole table ([`crate::data::check`]), prints per column
//! the count of valid, missing, out-of-range, unknown-level and otherwise invalid cells, and the
//! rows each split holds, and fails with the first problem named by file, line (or row group) and
//! column. It never prints a row or a cell value: its output may be pasted into a ticket.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use sanctum_protocol::dataset::{ColumnKind, Schema};

use crate::data::{self, TableSource};
use crate::table::Format;

/// `sanctum-node data …`
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Check a table (CSV or Parquet) against a schema file; exit 1 on the first problem.
    Check {
        /// The schema file (TOML) the consortium distributes.
        #[arg(long)]
        schema: PathBuf,
        /// The table.
        #[arg(long)]
        data: PathBuf,
        /// `csv` or `parquet` (default: from the file's extension).
        #[arg(long)]
        format: Option<Format>,
        /// A column the table names otherwise: `SCHEMA_COLUMN=TABLE_COLUMN` (repeatable), as
        /// `[datasets.columns]` in node.toml.
        #[arg(long = "map", value_name = "SCHEMA_COLUMN=TABLE_COLUMN")]
        map: Vec<String>,
        /// Print the counts as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `data` command; an error is the first problem found.
pub fn run(cmd: &DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Check { schema, data: path, format, map, json } => {
            let schema = Schema::load(schema).with_context(|| format!("schema {}", schema.display()))?;
            let mut columns = BTreeMap::new();
            for m in map {
                let (from, to) =
                    m.split_once('=').with_context(|| format!("--map {m:?}: write SCHEMA_COLUMN=TABLE_COLUMN"))?;
                columns.insert(from.trim().to_string(), to.trim().to_string());
            }
            let source = TableSource { path: path.clone(), format: *format, columns };
            let started = std::time::Instant::now();
            let report = data::check(&source, &schema).map_err(|e| anyhow::anyhow!("{}", e.steward_reason()))?;
            let seconds = started.elapsed().as_secs_f64();
            if *json {
                let out = serde_json::json!({
                    "schema": schema.name(),
                    "schema_sha256": schema.sha256().to_hex(),
                    "task": schema.task().to_string(),
                    "features": schema.features().len(),
                    "rows": report.rows,
                    "train_rows": report.train_rows,
                    "test_rows": report.test_rows,
                    "columns": report.columns.iter().map(|(n, c)| (n.clone(), serde_json::to_value(c).unwrap_or_default())).collect::<serde_json::Map<_, _>>(),
                    "first_problem": report.first_problem.as_ref().map(|e| e.steward_reason()),
                    "seconds": seconds,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "schema {} (SHA-256 {}), task {}, {} model inputs",
                    schema.name(),
                    schema.sha256().to_hex(),
                    schema.task(),
                    schema.features().len()
                );
                println!("table {}: {} rows read in {seconds:.2} s", path.display(), report.rows);
                println!(
                    "{:<32} {:<12} {:>10} {:>9} {:>12} {:>14} {:>9} {:>9}",
                    "column", "type", "valid", "missing", "out of range", "unknown level", "invalid", "dropped"
                );
                for ((name, c), col) in report.columns.iter().zip(schema.columns()) {
                    let levels = match col.kind() {
                        ColumnKind::Categorical { .. } => c.unknown_levels.to_string(),
                        _ => "-".into(),
                    };
                    println!(
                        "{:<32} {:<12} {:>10} {:>9} {:>12} {:>14} {:>9} {:>9}",
                        shorten(name, 32),
                        col.kind().name(),
                        c.valid,
                        c.missing,
                        c.out_of_range,
                        levels,
                        c.invalid,
                        c.dropped_rows
                    );
                }
                println!("split: {} train rows, {} test rows", report.train_rows, report.test_rows);
            }
            match &report.first_problem {
                None => {
                    if !*json {
                        println!("ok: the table follows the schema");
                    }
                    Ok(())
                }
                // File, position, column and rule, never the value.
                Some(e) => anyhow::bail!("{}", e.steward_reason()),
            }
        }
    }
}

/// At most `max` characters (a column name can be long), never cut inside a character.
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max.saturating_sub(1)) {
        Some((at, _)) if text.chars().count() > max => format!("{}…", &text[..at]),
        _ => text.to_string(),
    }
}
