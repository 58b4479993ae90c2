//! Loads a hospital's CSV and validates it against a plan's schema. Errors name the file, the
//! line and the column, so the data steward can fix the row. Standardisation uses the node's own
//! train split only: no statistic crosses the hospital boundary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sanctum_protocol::schema::Schema;

/// A validated, standardised local dataset (row-major features).
#[derive(Debug, Clone)]
pub struct LocalData {
    pub features: usize,
    /// Train-split mean and standard deviation per feature, before standardisation (for `check`
    /// and tests; they never leave the node).
    pub train_mean: Vec<f64>,
    pub train_std: Vec<f64>,
    pub train_x: Vec<f32>,
    pub train_y: Vec<f32>,
    pub test_x: Vec<f32>,
    pub test_y: Vec<f32>,
}

impl LocalData {
    pub fn train_len(&self) -> usize {
        self.train_y.len()
    }
    pub fn test_len(&self) -> usize {
        self.test_y.len()
    }
}

/// Why a data file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read data file {path}: {source}; check datasets.path in the node config")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: column '{column}' required by schema '{schema}' is missing (header has: {found})")]
    MissingColumn { path: PathBuf, column: String, schema: String, found: String },
    #[error("{path} line {line}, column {column} ({name}): {problem}")]
    Cell { path: PathBuf, line: u64, column: usize, name: String, problem: String },
    #[error("{path} line {line}: {problem}")]
    Row { path: PathBuf, line: u64, problem: String },
    #[error("{path}: the {split} split is empty; the schema needs rows with {column} = {split}")]
    EmptySplit { path: PathBuf, split: &'static str, column: String },
}

/// Reads and validates `path` against `schema`.
pub fn load(path: &Path, schema: &Schema) -> Result<LocalData, DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Read { path: path.to_path_buf(), source })?;
    let mut reader = csv::ReaderBuilder::new().has_headers(true).trim(csv::Trim::All).from_reader(file);
    let headers = reader
        .headers()
        .map_err(|e| DataError::Row { path: path.to_path_buf(), line: 1, problem: format!("unreadable header: {e}") })?
        .clone();
    let index: HashMap<&str, usize> = headers.iter().enumerate().map(|(i, h)| (h, i)).collect();
    let col = |name: &str| {
        index.get(name).copied().ok_or_else(|| DataError::MissingColumn {
            path: path.to_path_buf(),
            column: name.to_string(),
            schema: schema.name.to_string(),
            found: headers.iter().collect::<Vec<_>>().join(", "),
        })
    };
    let feature_cols = schema.features.iter().map(|f| col(f)).collect::<Result<Vec<_>, _>>()?;
    let label_col = col(schema.label)?;
    let split_col = col(schema.split)?;

    let d = schema.features.len();
    let (mut train_x, mut train_y, mut test_x, mut test_y) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            DataError::Row { path: path.to_path_buf(), line, problem: e.to_string() }
        })?;
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        let cell = |c: usize| -> Result<f64, DataError> {
            let raw = record.get(c).unwrap_or("");
            let problem = if raw.is_empty() || raw == "?" {
                Some("value is missing".to_string())
            } else {
                match raw.parse::<f64>() {
                    Ok(v) if v.is_finite() => None,
                    Ok(_) => Some(format!("'{raw}' is not a finite number")),
                    Err(_) => Some(format!("'{raw}' is not a number")),
                }
            };
            match problem {
                None => Ok(raw.parse::<f64>().unwrap_or(0.0)),
                Some(problem) => Err(DataError::Cell {
                    path: path.to_path_buf(),
                    line,
                    column: c + 1,
                    name: headers.get(c).unwrap_or("").to_string(),
                    problem: format!("{problem}; fix or remove the row"),
                }),
            }
        };
        let mut row = Vec::with_capacity(d);
        for &c in &feature_cols {
            row.push(cell(c)? as f32);
        }
        let label = cell(label_col)?;
        if label != 0.0 && label != 1.0 {
            return Err(DataError::Cell {
                path: path.to_path_buf(),
                line,
                column: label_col + 1,
                name: schema.label.to_string(),
                problem: format!("label {label} is not 0 or 1"),
            });
        }
        match record.get(split_col).unwrap_or("") {
            "train" => {
                train_x.extend(row);
                train_y.push(label as f32);
            }
            "test" => {
                test_x.extend(row);
                test_y.push(label as f32);
            }
            other => {
                return Err(DataError::Cell {
                    path: path.to_path_buf(),
                    line,
                    column: split_col + 1,
                    name: schema.split.to_string(),
                    problem: format!("'{other}' is neither 'train' nor 'test'"),
                });
            }
        }
    }
    for (rows, split) in [(&train_y, "train"), (&test_y, "test")] {
        if rows.is_empty() {
            return Err(DataError::EmptySplit { path: path.to_path_buf(), split, column: schema.split.to_string() });
        }
    }
    let (train_mean, train_std) =
        if schema.standardize { standardize(&mut train_x, &mut test_x, d) } else { (vec![0.0; d], vec![1.0; d]) };
    Ok(LocalData { features: d, train_mean, train_std, train_x, train_y, test_x, test_y })
}

/// (x − mean) / (std + 1e-9) per feature with the train split's mean and sample std (ddof = 1),
/// exactly as FLamby normalises each center. Returns the means and standard deviations.
fn standardize(train: &mut [f32], test: &mut [f32], d: usize) -> (Vec<f64>, Vec<f64>) {
    let n = train.len() / d;
    let (mut means, mut stds) = (Vec::with_capacity(d), Vec::with_capacity(d));
    for j in 0..d {
        let mean = (0..n).map(|i| f64::from(train[i * d + j])).sum::<f64>() / n as f64;
        let var = if n > 1 {
            (0..n).map(|i| (f64::from(train[i * d + j]) - mean).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        let scale = var.sqrt() + 1e-9;
        for x in train.iter_mut().skip(j).step_by(d).chain(test.iter_mut().skip(j).step_by(d)) {
            *x = ((f64::from(*x) - mean) / scale) as f32;
        }
        means.push(mean);
        stds.push(var.sqrt());
    }
    (means, stds)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use sanctum_protocol::schema::HEART_DISEASE;

    use super::*;

    const HEADER: &str =
        "age,sex,trestbps,chol,fbs,thalach,exang,oldpeak,cp_2,cp_3,cp_4,restecg_1,restecg_2,label,split";

    fn file(body: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        write!(f, "{HEADER}\n{body}").unwrap();
        f
    }

    #[test]
    fn loads_and_standardises_with_train_statistics() {
        let f = file(
            "60,1,140,200,0,150,0,1.0,0,0,1,0,1,1,train\n50,0,120,220,0,160,1,0.0,1,0,0,1,0,0,train\n55,1,130,210,1,155,0,0.5,0,1,0,0,0,1,test\n",
        );
        let d = load(f.path(), &HEART_DISEASE).unwrap();
        assert_eq!((d.train_len(), d.test_len(), d.features), (2, 1, 13));
        // age: mean 55, std √50 → train ±0.7071, test 0.
        assert!((d.train_x[0] - 0.70710677).abs() < 1e-5);
        assert!(d.test_x[0].abs() < 1e-6);
        assert_eq!(d.train_y, vec![1.0, 0.0]);
    }

    #[test]
    fn bad_cells_name_file_line_and_column() {
        let f = file("60,1,140,abc,0,150,0,1.0,0,0,1,0,1,1,train\n");
        let e = load(f.path(), &HEART_DISEASE).unwrap_err().to_string();
        assert!(e.contains("line 2, column 4 (chol)") && e.contains("'abc' is not a number"), "{e}");
        let f = file("60,1,140,200,0,150,0,1.0,0,0,1,0,1,1,train\n60,1,140,200,0,150,0,,0,0,1,0,1,1,train\n");
        let e = load(f.path(), &HEART_DISEASE).unwrap_err().to_string();
        assert!(e.contains("line 3, column 8 (oldpeak): value is missing"), "{e}");
        let f = file("60,1,140,200,0,150,0,1.0,0,0,1,0,1,1\n");
        let e = load(f.path(), &HEART_DISEASE).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        let f = file("60,1,140,200,0,150,0,1.0,0,0,1,0,1,2,train\n");
        assert!(load(f.path(), &HEART_DISEASE).unwrap_err().to_string().contains("not 0 or 1"));
        let f = file("60,1,140,200,0,150,0,1.0,0,0,1,0,1,1,train\n");
        assert!(load(f.path(), &HEART_DISEASE).unwrap_err().to_string().contains("test split is empty"));
    }

    #[test]
    fn standardisation_matches_flamby_per_center() {
        let golden: serde_json::Value =
            serde_json::from_str(include_str!("../testdata/flamby_heart_norm_stats.json")).unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/heart_disease/data");
        for (center, name) in ["cleveland", "hungarian", "switzerland", "va"].iter().enumerate() {
            let d = load(&dir.join(format!("{name}.csv")), &HEART_DISEASE).unwrap();
            let want = &golden["per_center_train"][center.to_string()];
            assert_eq!(want["n"].as_u64().unwrap() as usize, d.train_len(), "{name}");
            for j in 0..13 {
                let (m, s) = (want["mean"][j].as_f64().unwrap(), want["std_ddof1"][j].as_f64().unwrap());
                assert!((d.train_mean[j] - m).abs() < 1e-6, "{name} feature {j}: mean {} vs {m}", d.train_mean[j]);
                assert!((d.train_std[j] - s).abs() < 1e-6, "{name} feature {j}: std {} vs {s}", d.train_std[j]);
            }
        }
    }

    #[test]
    fn missing_file_and_missing_column() {
        let e = load(Path::new("/nonexistent/heart.csv"), &HEART_DISEASE).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/heart.csv") && e.contains("datasets.path"), "{e}");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "age,sex\n1,2").unwrap();
        let e = load(f.path(), &HEART_DISEASE).unwrap_err().to_string();
        assert!(e.contains("column 'trestbps'"), "{e}");
    }
}
