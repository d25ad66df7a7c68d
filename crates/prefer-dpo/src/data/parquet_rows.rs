//! Preference rows from Parquet, the format of the Hugging Face Hub's datasets. Each record becomes
//! the JSON object a JSON Lines row would be (strings, lists of message structs, nulls), so every
//! row format reads the same way from either file and gives the same token ids.

use std::{fs::File, path::Path};

use parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::Value;

use super::formats::{BadRow, Record};

/// Whether `path` names a Parquet file (by its extension).
pub fn is_parquet(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// The records of the Parquet file at `path`, each located as `name: row N` (from 1, across row
/// groups). A file that cannot be opened or decoded is an error naming it (and the row, when one
/// record fails).
pub(crate) fn read_records(path: &Path, name: &str) -> Result<Vec<Record>, BadRow> {
    let whole = |reason: String| BadRow {
        location: name.to_string(),
        reason,
    };
    let file = File::open(path).map_err(|e| whole(e.to_string()))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| whole(format!("not a readable Parquet file: {e}")))?;
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| whole(format!("unreadable Parquet schema: {e}")))?;
    let mut records = Vec::new();
    for (i, row) in rows.enumerate() {
        let location = format!("{name}: row {}", i + 1);
        match row {
            Ok(row) => records.push((location, Ok::<Value, String>(row.to_json_value()))),
            Err(e) => {
                return Err(BadRow {
                    location,
                    reason: format!("undecodable Parquet record: {e}"),
                });
            }
        }
    }
    Ok(records)
}
