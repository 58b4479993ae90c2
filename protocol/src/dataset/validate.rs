//! Every rule of the schema format, from the raw TOML to a [`Schema`]. Each refusal names the
//! field as a path (`columns[3] 'cp'.levels`) and says what to write instead. The limits in
//! [`super::limits`] are checked before anything is built from a count, so a hostile file cannot
//! make a node allocate more than its own size allows.
//!
//! Length: the rule book of one file format: every refusal a schema can get is here, so a reviewer
//! checks the format against one file; its types (`cell.rs`, `raw.rs`) and limits (`limits.rs`)
//! already live apart.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::cell::{CellValue, Column, ColumnKind, MissingPolicy, Role};
use super::limits::{MAX_COLUMNS, MAX_FEATURES, MAX_LEVELS, MAX_MISSING_TOKENS, MAX_PROSE, MAX_STRING};
use super::raw::{
    RawColumn, RawImpute, RawKind, RawMissing, RawNumber, RawPrivacy, RawRowsPerPatient, RawSchema, RawSplit,
    RawSplitRule, RawStandardize, RawTarget, RawTask, RawUnit, RawWith,
};
use super::{
    DeclaredStatistics, Feature, FeatureInput, PatientRows, PrivacyUnit, Schema, SchemaError, SplitColumn, SplitRule,
    Standardization, Target, Task,
};
use crate::hash::ContentHash;

/// The CSV tokens that mean missing when the schema does not list its own.
const DEFAULT_MISSING: [&str; 4] = ["", "?", "NA", "NaN"];

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> SchemaError {
    SchemaError::Invalid { field: field.into(), reason: reason.into() }
}

/// Builds and checks the schema.
pub(super) fn validate(raw: RawSchema, sha256: ContentHash) -> Result<Schema, SchemaError> {
    check_schema_name(&raw.name)?;
    if let Some(v) = &raw.version {
        check_len("version", v, MAX_STRING)?;
    }
    if let Some(d) = &raw.description {
        check_len("description", d, MAX_PROSE)?;
    }
    let missing_tokens = missing_tokens(raw.missing_values)?;

    if raw.columns.len() > MAX_COLUMNS {
        return Err(invalid(
            "columns",
            format!("{} columns is more than the {MAX_COLUMNS} a schema may declare", raw.columns.len()),
        ));
    }
    // Names first: every later message names a column by its (then valid) name.
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(raw.columns.len());
    for (i, c) in raw.columns.iter().enumerate() {
        check_text(&format!("columns[{i}].name"), &c.name, MAX_STRING)?;
        if let Some(first) = index.insert(c.name.as_str(), i) {
            return Err(invalid(
                format!("columns[{i}] '{}'.name", c.name),
                format!("the name is already used by columns[{first}]; column names must be unique"),
            ));
        }
    }

    let task = raw.task;
    let target = target(&raw.target, task, &index)?;
    let (split_at, split_rule) = split(&raw.split)?;
    let split_col = split_at.map(|name| lookup(&index, "split.column", name)).transpose()?;
    let privacy_unit = privacy(&raw.privacy, &index)?;

    // Roles: each column has at most one.
    let mut roles = vec![Role::Feature; raw.columns.len()];
    let mut assign = |column: usize, role: Role, field: &str| -> Result<(), SchemaError> {
        if roles[column] != Role::Feature {
            return Err(invalid(
                field,
                format!(
                    "column '{}' is already the {}; the label, time, event, split and id columns must be different columns",
                    raw.columns[column].name,
                    role_name(roles[column])
                ),
            ));
        }
        roles[column] = role;
        Ok(())
    };
    match target {
        Target::Label { column } => assign(column, Role::Label, "target.label")?,
        Target::Survival { time, event } => {
            assign(time, Role::Time, "target.time")?;
            assign(event, Role::Event, "target.event")?;
        }
    }
    if let Some(c) = split_col {
        assign(c, Role::Split, "split.column")?;
    }
    if let Some(c) = privacy_unit.id_column() {
        assign(c, Role::Id, "privacy.id_column")?;
    }

    let tokens: Arc<[String]> = missing_tokens.clone().into();
    let mut columns = Vec::with_capacity(raw.columns.len());
    for (i, (c, &role)) in raw.columns.iter().zip(&roles).enumerate() {
        columns.push(column(i, c, role, &tokens)?);
    }

    let task = check_target_types(task, target, &columns)?;
    let split = match (split_col, split_rule) {
        (Some(c), _) => {
            let (train, test) = split_spellings(&raw.split)?;
            check_split_column(&columns[c], c, &train, &test)?;
            let drop_missing = matches!(columns[c].missing, MissingPolicy::DropRow);
            SplitRule::Column(SplitColumn { column: c, train, test, drop_missing, missing_tokens: tokens.clone() })
        }
        (None, Some(rule)) => rule,
        (None, None) => return Err(invalid("split", "declare either column = \"...\" or rule = \"hash\"")),
    };
    if let Some(c) = privacy_unit.id_column()
        && !matches!(columns[c].kind, ColumnKind::Text | ColumnKind::Integer { .. })
    {
        return Err(invalid(
            format!("columns[{c}] '{}'.type", columns[c].name),
            "a patient-id column is type \"text\" or \"integer\"",
        ));
    }

    let features = features(&columns)?;
    let standardization = standardization(raw.standardize.as_ref(), &raw.columns, &columns, &features)?;

    Ok(Schema {
        name: raw.name,
        version: raw.version,
        description: raw.description,
        task,
        missing_tokens,
        columns,
        features,
        target,
        split,
        privacy_unit,
        standardization,
        sha256,
    })
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Feature => "feature",
        Role::Label => "label column (target.label)",
        Role::Time => "time column (target.time)",
        Role::Event => "event column (target.event)",
        Role::Split => "split column (split.column)",
        Role::Id => "patient-id column (privacy.id_column)",
    }
}

/// `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`: the ledger keys budgets by it and file names carry it.
fn check_schema_name(name: &str) -> Result<(), SchemaError> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && name.len() <= 64;
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "name",
            "a schema name is 1 to 64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit",
        ))
    }
}

fn check_len(field: &str, text: &str, max: usize) -> Result<(), SchemaError> {
    if text.chars().count() > max {
        return Err(invalid(field, format!("longer than {max} characters; shorten it")));
    }
    Ok(())
}

/// A name, level or spelling: non-empty, bounded, no control characters (they would forge lines
/// in a node's log) and no surrounding spaces (a node trims cells, so such a value never matches).
fn check_text(field: &str, text: &str, max: usize) -> Result<(), SchemaError> {
    if text.is_empty() {
        return Err(invalid(field, "is empty; give it a value"));
    }
    check_len(field, text, max)?;
    if text.chars().any(char::is_control) {
        return Err(invalid(field, "contains a control character; use printable text"));
    }
    if text.trim() != text {
        return Err(invalid(field, "starts or ends with a space, which a trimmed cell never matches; remove it"));
    }
    Ok(())
}

fn missing_tokens(raw: Option<Vec<String>>) -> Result<Vec<String>, SchemaError> {
    let tokens = raw.unwrap_or_else(|| DEFAULT_MISSING.iter().map(|s| s.to_string()).collect());
    if tokens.len() > MAX_MISSING_TOKENS {
        return Err(invalid("missing_values", format!("more than {MAX_MISSING_TOKENS} tokens; list fewer")));
    }
    for (i, t) in tokens.iter().enumerate() {
        check_len(&format!("missing_values[{i}]"), t, MAX_STRING)?;
        if t.chars().any(char::is_control) || t.trim() != t {
            return Err(invalid(
                format!("missing_values[{i}]"),
                "contains a control character or surrounding spaces; a cell is trimmed before it is compared",
            ));
        }
    }
    Ok(tokens)
}

fn lookup(index: &HashMap<&str, usize>, field: &str, name: &str) -> Result<usize, SchemaError> {
    index.get(name).copied().ok_or_else(|| {
        invalid(
            field,
            format!(
                "column '{}' is not listed in [[columns]]; add a [[columns]] entry with that name or fix the name",
                name.chars().take(MAX_STRING).collect::<String>()
            ),
        )
    })
}

fn target(raw: &RawTarget, task: RawTask, index: &HashMap<&str, usize>) -> Result<Target, SchemaError> {
    match task {
        RawTask::Binary | RawTask::Multiclass | RawTask::Regression => {
            for (field, v) in [("target.time", &raw.time), ("target.event", &raw.event)] {
                if v.is_some() {
                    return Err(invalid(field, "only a survival task has time and event columns; use target.label"));
                }
            }
            let label = raw
                .label
                .as_deref()
                .ok_or_else(|| invalid("target.label", "is required for this task; name the label column"))?;
            Ok(Target::Label { column: lookup(index, "target.label", label)? })
        }
        RawTask::Survival => {
            if raw.label.is_some() {
                return Err(invalid(
                    "target.label",
                    "a survival task has no label; declare target.time and target.event instead",
                ));
            }
            let time = raw
                .time
                .as_deref()
                .ok_or_else(|| invalid("target.time", "is required for a survival task; name the time column"))?;
            let event = raw
                .event
                .as_deref()
                .ok_or_else(|| invalid("target.event", "is required for a survival task; name the event column"))?;
            Ok(Target::Survival {
                time: lookup(index, "target.time", time)?,
                event: lookup(index, "target.event", event)?,
            })
        }
    }
}

/// The split column's name, or the hash rule.
fn split(raw: &RawSplit) -> Result<(Option<&str>, Option<SplitRule>), SchemaError> {
    match (&raw.column, raw.rule) {
        (Some(_), Some(_)) => Err(invalid("split", "declare either column or rule, not both")),
        (None, None) => Err(invalid("split", "declare either column = \"...\" or rule = \"hash\"")),
        (Some(c), None) => {
            for (field, set) in
                [("split.test_fraction", raw.test_fraction.is_some()), ("split.seed", raw.seed.is_some())]
            {
                if set {
                    return Err(invalid(field, "only applies with rule = \"hash\"; remove it or drop split.column"));
                }
            }
            Ok((Some(c.as_str()), None))
        }
        (None, Some(RawSplitRule::Hash)) => {
            for (field, set) in [("split.train", raw.train.is_some()), ("split.test", raw.test.is_some())] {
                if set {
                    return Err(invalid(field, "only applies with split.column; remove it"));
                }
            }
            let f = raw.test_fraction.ok_or_else(|| {
                invalid("split.test_fraction", "is required with rule = \"hash\"; give the test share, e.g. 0.25")
            })?;
            if !(f.is_finite() && f > 0.0 && f < 1.0) {
                return Err(invalid("split.test_fraction", "must be strictly between 0 and 1, e.g. 0.25"));
            }
            Ok((None, Some(SplitRule::Hash { seed: raw.seed.unwrap_or(0), test_fraction: f })))
        }
    }
}

fn split_spellings(raw: &RawSplit) -> Result<(String, String), SchemaError> {
    let train = raw.train.clone().unwrap_or_else(|| "train".into());
    let test = raw.test.clone().unwrap_or_else(|| "test".into());
    check_text("split.train", &train, MAX_STRING)?;
    check_text("split.test", &test, MAX_STRING)?;
    if train == test {
        return Err(invalid("split.test", "is the same text as split.train; give train and test different values"));
    }
    Ok((train, test))
}

fn check_split_column(column: &Column, at: usize, train: &str, test: &str) -> Result<(), SchemaError> {
    let field = format!("columns[{at}] '{}'", column.name);
    match &column.kind {
        ColumnKind::Text => Ok(()),
        ColumnKind::Categorical { levels, .. } => {
            let ok = levels.len() == 2 && levels.iter().any(|l| l == train) && levels.iter().any(|l| l == test);
            if ok {
                Ok(())
            } else {
                Err(invalid(
                    format!("{field}.levels"),
                    format!(
                        "the split column's levels must be exactly its train and test values ['{train}', '{test}']"
                    ),
                ))
            }
        }
        _ => Err(invalid(
            format!("{field}.type"),
            "the split column is type \"categorical\" (levels = its train and test values) or \"text\"",
        )),
    }
}

fn privacy(raw: &RawPrivacy, index: &HashMap<&str, usize>) -> Result<PrivacyUnit, SchemaError> {
    match raw.unit {
        RawUnit::Row => {
            if raw.rows_per_patient.is_some() {
                return Err(invalid("privacy.rows_per_patient", "only applies with unit = \"patient\"; remove it"));
            }
            if raw.id_column.is_some() {
                return Err(invalid("privacy.id_column", "only applies with unit = \"patient\"; remove it"));
            }
            Ok(PrivacyUnit::Row)
        }
        RawUnit::Patient => {
            let id = raw.id_column.as_deref().map(|n| lookup(index, "privacy.id_column", n)).transpose()?;
            match raw.rows_per_patient {
                None => Err(invalid(
                    "privacy.rows_per_patient",
                    "is required with unit = \"patient\": say \"one\" or \"several\" (what the DP guarantee protects depends on it)",
                )),
                Some(RawRowsPerPatient::One) => Ok(PrivacyUnit::Patient(PatientRows::OnePerPatient { id_column: id })),
                Some(RawRowsPerPatient::Several) => match id {
                    Some(id_column) => Ok(PrivacyUnit::Patient(PatientRows::Several { id_column })),
                    None => Err(invalid(
                        "privacy.id_column",
                        "is required with rows_per_patient = \"several\"; name the column that links a patient's rows",
                    )),
                },
            }
        }
    }
}

/// One `[[columns]]` entry, checked on its own (roles already assigned).
fn column(i: usize, c: &RawColumn, role: Role, tokens: &Arc<[String]>) -> Result<Column, SchemaError> {
    let field = |key: &str| format!("columns[{i}] '{}'.{key}", c.name);
    if let Some(u) = &c.unit {
        check_len(&field("unit"), u, MAX_STRING)?;
    }
    let refuse = |key: &str, set: bool, why: &str| -> Result<(), SchemaError> {
        if set { Err(invalid(field(key), why.to_string())) } else { Ok(()) }
    };
    let is_categorical = c.kind == RawKind::Categorical;
    if !is_categorical {
        refuse(
            "levels",
            c.levels.is_some(),
            "only a categorical column has levels; remove it or set type = \"categorical\"",
        )?;
    }
    if !(is_categorical && role == Role::Feature) {
        let why = "only applies to a categorical feature column; remove it";
        refuse("encoding", c.encoding.is_some(), why)?;
        refuse("drop_first", c.drop_first.is_some(), why)?;
    }
    if !matches!(c.kind, RawKind::Numeric | RawKind::Integer) {
        let why = "only a numeric or integer column has bounds; remove it";
        refuse("min", c.min.is_some(), why)?;
        refuse("max", c.max.is_some(), why)?;
    }

    let mut kind = match c.kind {
        RawKind::Numeric => {
            let bound = |key: &str, v: Option<RawNumber>| -> Result<Option<f64>, SchemaError> {
                match v.map(RawNumber::as_f64) {
                    Some(x) if !x.is_finite() => Err(invalid(field(key), "must be a finite number")),
                    other => Ok(other),
                }
            };
            ColumnKind::Numeric { min: bound("min", c.min)?, max: bound("max", c.max)? }
        }
        RawKind::Integer => {
            let bound = |key: &str, v: Option<RawNumber>| -> Result<Option<i64>, SchemaError> {
                match v {
                    None => Ok(None),
                    Some(RawNumber::Int(x)) => Ok(Some(x)),
                    Some(RawNumber::Float(x)) => integral(x).map(Some).ok_or_else(|| {
                        invalid(field(key), "an integer column's bound must be an integer, e.g. 0 or 5")
                    }),
                }
            };
            ColumnKind::Integer { min: bound("min", c.min)?, max: bound("max", c.max)? }
        }
        RawKind::Categorical => {
            let levels = c.levels.clone().ok_or_else(|| {
                invalid(field("levels"), "a categorical column needs its levels, e.g. levels = [\"1\", \"2\"]")
            })?;
            check_levels(&field("levels"), &levels, tokens)?;
            ColumnKind::Categorical { levels, drop_first: c.drop_first.unwrap_or(false) }
        }
        RawKind::Boolean => ColumnKind::Boolean,
        RawKind::Text => {
            if !matches!(role, Role::Id | Role::Split) {
                return Err(invalid(
                    field("type"),
                    "a text column can only be the patient-id or split column; a feature or target is numeric, integer, categorical or boolean",
                ));
            }
            ColumnKind::Text
        }
    };
    match &kind {
        ColumnKind::Numeric { min: Some(lo), max: Some(hi) } if lo > hi => {
            return Err(invalid(field("min"), format!("min {lo} is greater than max {hi}; swap or fix them")));
        }
        ColumnKind::Integer { min: Some(lo), max: Some(hi) } if lo > hi => {
            return Err(invalid(field("min"), format!("min {lo} is greater than max {hi}; swap or fix them")));
        }
        _ => {}
    }
    // A survival time is never negative: an absent min is min 0, checked on every cell.
    if role == Role::Time {
        match &mut kind {
            ColumnKind::Numeric { min, .. } if min.is_none() => *min = Some(0.0),
            ColumnKind::Integer { min, .. } if min.is_none() => *min = Some(0),
            _ => {}
        }
    }

    let feature = role == Role::Feature;
    if !feature {
        let why = format!("the {} is not a feature, so it is never standardised; remove it", role_name(role));
        refuse("standardize", c.standardize.is_some(), &why)?;
        refuse("mean", c.mean.is_some(), &why)?;
        refuse("std", c.std.is_some(), &why)?;
    }
    let standardize = match (c.standardize, &kind) {
        (Some(true), ColumnKind::Categorical { .. }) => {
            return Err(invalid(field("standardize"), "a one-hot encoded column is never standardised; remove it"));
        }
        (Some(s), _) => s && feature,
        (None, ColumnKind::Numeric { .. } | ColumnKind::Integer { .. }) => feature,
        (None, _) => false,
    };

    let level_index = match &kind {
        ColumnKind::Categorical { levels, .. } => levels.iter().enumerate().map(|(i, l)| (l.clone(), i)).collect(),
        _ => HashMap::new(),
    };
    let mut column = Column {
        name: c.name.clone(),
        kind,
        unit: c.unit.clone(),
        role,
        missing: MissingPolicy::Refuse,
        standardize,
        missing_tokens: tokens.clone(),
        level_index,
    };
    column.missing = missing_policy(&field, c, &column)?;
    Ok(column)
}

/// An integral f64 within i64, as i64.
fn integral(x: f64) -> Option<i64> {
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    (x.is_finite() && x.fract() == 0.0 && (-LIMIT..LIMIT).contains(&x)).then_some(x as i64)
}

fn check_levels(field: &str, levels: &[String], tokens: &[String]) -> Result<(), SchemaError> {
    if levels.is_empty() {
        return Err(invalid(field, "is empty; list the column's levels"));
    }
    if levels.len() > MAX_LEVELS {
        return Err(invalid(field, format!("{} levels is more than the {MAX_LEVELS} a column may have", levels.len())));
    }
    let mut seen = HashSet::with_capacity(levels.len());
    for (j, l) in levels.iter().enumerate() {
        check_text(&format!("{field}[{j}]"), l, MAX_STRING)?;
        if !seen.insert(l.as_str()) {
            return Err(invalid(format!("{field}[{j}]"), format!("level '{l}' is listed twice; list each level once")));
        }
        if tokens.iter().any(|t| t == l) {
            return Err(invalid(
                format!("{field}[{j}]"),
                format!(
                    "level '{l}' is also a missing_values token, so a cell could never read as it; rename the level or change missing_values"
                ),
            ));
        }
    }
    Ok(())
}

fn missing_policy(
    field: &dyn Fn(&str) -> String,
    c: &RawColumn,
    column: &Column,
) -> Result<MissingPolicy, SchemaError> {
    let policy = c.missing.unwrap_or(RawMissing::Refuse);
    if policy != RawMissing::Impute {
        if c.impute.is_some() {
            return Err(invalid(field("impute"), "only applies with missing = \"impute\"; set it or remove impute"));
        }
        return Ok(match policy {
            RawMissing::DropRow => MissingPolicy::DropRow,
            _ => MissingPolicy::Refuse,
        });
    }
    if column.role != Role::Feature {
        return Err(invalid(
            field("missing"),
            format!(
                "the {} cannot be imputed (an imputed target, split or id is made-up data); use \"refuse\" or \"drop_row\"",
                role_name(column.role)
            ),
        ));
    }
    let value = c.impute.as_ref().ok_or_else(|| {
        invalid(field("impute"), "is required with missing = \"impute\"; give the value a missing cell takes")
    })?;
    let wrong = |what: &str| invalid(field("impute"), format!("must be {what}: the column is {}", column.kind.name()));
    let v = match (&column.kind, value) {
        (ColumnKind::Numeric { .. }, RawImpute::Int(i)) => CellValue::Number(*i as f64),
        (ColumnKind::Numeric { .. }, RawImpute::Float(f)) => CellValue::Number(*f),
        (ColumnKind::Numeric { .. }, _) => return Err(wrong("a number")),
        (ColumnKind::Integer { .. }, RawImpute::Int(i)) => CellValue::Integer(*i),
        (ColumnKind::Integer { .. }, RawImpute::Float(f)) => {
            CellValue::Integer(integral(*f).ok_or_else(|| wrong("an integer"))?)
        }
        (ColumnKind::Integer { .. }, _) => return Err(wrong("an integer")),
        (ColumnKind::Boolean, RawImpute::Bool(b)) => CellValue::Boolean(*b),
        (ColumnKind::Boolean, _) => return Err(wrong("true or false")),
        (ColumnKind::Categorical { .. }, RawImpute::Text(t)) => match column.level_index.get(t.as_str()) {
            Some(&i) => CellValue::Level(i),
            None => {
                return Err(invalid(
                    field("impute"),
                    "is not one of the column's levels; impute a declared level by its name",
                ));
            }
        },
        (ColumnKind::Categorical { .. }, _) => return Err(wrong("a level name (a string)")),
        (ColumnKind::Text, _) => return Err(wrong("absent")),
    };
    // The same check a cell gets: a finite value within the declared bounds.
    let in_range = match (v, &column.kind) {
        (CellValue::Number(x), ColumnKind::Numeric { min, max }) => {
            x.is_finite() && min.is_none_or(|lo| x >= lo) && max.is_none_or(|hi| x <= hi)
        }
        (CellValue::Integer(x), ColumnKind::Integer { min, max }) => {
            min.is_none_or(|lo| x >= lo) && max.is_none_or(|hi| x <= hi)
        }
        _ => true,
    };
    if !in_range {
        return Err(invalid(field("impute"), "is outside the column's [min, max]; impute a value within the bounds"));
    }
    Ok(MissingPolicy::Impute(v))
}

/// The types each task allows for its target columns; the multi-class count from the label.
fn check_target_types(task: RawTask, target: Target, columns: &[Column]) -> Result<Task, SchemaError> {
    let field = |c: usize| format!("columns[{c}] '{}'.type", columns[c].name);
    let zero_one = |k: &ColumnKind| matches!(k, ColumnKind::Integer { min: Some(0), max: Some(1) });
    match (task, target) {
        (RawTask::Binary, Target::Label { column }) => {
            let k = &columns[column].kind;
            let ok = matches!(k, ColumnKind::Boolean)
                || zero_one(k)
                || matches!(k, ColumnKind::Categorical { levels, .. } if levels.len() == 2);
            if !ok {
                return Err(invalid(
                    field(column),
                    "a binary label is boolean, integer with min = 0 and max = 1, or categorical with 2 levels",
                ));
            }
            Ok(Task::Binary)
        }
        (RawTask::Multiclass, Target::Label { column }) => {
            let classes = match &columns[column].kind {
                ColumnKind::Categorical { levels, .. } => levels.len(),
                ColumnKind::Integer { min: Some(lo), max: Some(hi) } => {
                    let n = i128::from(*hi) - i128::from(*lo) + 1;
                    if n > MAX_LEVELS as i128 {
                        return Err(invalid(
                            format!("columns[{column}] '{}'.max", columns[column].name),
                            format!("max − min + 1 = {n} classes is more than the {MAX_LEVELS} allowed"),
                        ));
                    }
                    n as usize
                }
                _ => {
                    return Err(invalid(
                        field(column),
                        "a multi-class label is categorical (classes = its levels) or integer with min and max (classes = max − min + 1)",
                    ));
                }
            };
            if classes < 2 {
                return Err(invalid(field(column), "a multi-class label needs at least 2 classes"));
            }
            Ok(Task::Multiclass { classes })
        }
        (RawTask::Regression, Target::Label { column }) => {
            if !matches!(columns[column].kind, ColumnKind::Numeric { .. } | ColumnKind::Integer { .. }) {
                return Err(invalid(field(column), "a regression label is numeric or integer"));
            }
            Ok(Task::Regression)
        }
        (RawTask::Survival, Target::Survival { time, event }) => {
            match &columns[time].kind {
                ColumnKind::Numeric { min: Some(lo), .. } if *lo < 0.0 => {
                    return Err(invalid(
                        format!("columns[{time}] '{}'.min", columns[time].name),
                        "a survival time is never negative; set min >= 0",
                    ));
                }
                ColumnKind::Integer { min: Some(lo), .. } if *lo < 0 => {
                    return Err(invalid(
                        format!("columns[{time}] '{}'.min", columns[time].name),
                        "a survival time is never negative; set min >= 0",
                    ));
                }
                ColumnKind::Numeric { .. } | ColumnKind::Integer { .. } => {}
                _ => return Err(invalid(field(time), "a survival time is numeric or integer")),
            }
            let k = &columns[event].kind;
            if !(matches!(k, ColumnKind::Boolean) || zero_one(k)) {
                return Err(invalid(field(event), "a survival event is boolean or integer with min = 0 and max = 1"));
            }
            Ok(Task::Survival)
        }
        // `target` already matched the task's shape.
        (_, t) => Err(invalid("target", format!("{t:?} does not fit the task"))),
    }
}

/// The model inputs, in column order, one-hot expanded.
fn features(columns: &[Column]) -> Result<Vec<Feature>, SchemaError> {
    let mut out: Vec<Feature> = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, c) in columns.iter().enumerate().filter(|(_, c)| c.role == Role::Feature) {
        let inputs: Vec<(String, FeatureInput)> = match &c.kind {
            ColumnKind::Categorical { levels, drop_first } => {
                let skip = usize::from(*drop_first);
                if levels.len() <= skip {
                    return Err(invalid(
                        format!("columns[{i}] '{}'.drop_first", c.name),
                        "dropping the first of a single level leaves no input; remove drop_first or the column",
                    ));
                }
                if out.len() + levels.len() - skip > MAX_FEATURES {
                    return Err(too_many_features());
                }
                levels
                    .iter()
                    .enumerate()
                    .skip(skip)
                    .map(|(level, l)| (format!("{}={l}", c.name), FeatureInput::OneHot { level }))
                    .collect()
            }
            _ => vec![(c.name.clone(), FeatureInput::Value)],
        };
        for (name, input) in inputs {
            if out.len() >= MAX_FEATURES {
                return Err(too_many_features());
            }
            if let Some(&first) = names.get(&name) {
                return Err(invalid(
                    format!("columns[{i}] '{}'", c.name),
                    format!(
                        "its model input '{name}' has the same name as an input of columns[{first}] '{}'; rename one of the columns",
                        columns[first].name
                    ),
                ));
            }
            names.insert(name.clone(), i);
            let standardize = c.standardize && input == FeatureInput::Value;
            out.push(Feature { name, column: i, input, standardize });
        }
    }
    if out.is_empty() {
        return Err(invalid(
            "columns",
            "no feature: every column is the target, split or id; declare the columns the model learns from",
        ));
    }
    Ok(out)
}

fn too_many_features() -> SchemaError {
    invalid("columns", format!("more than {MAX_FEATURES} model inputs after one-hot expansion"))
}

fn standardization(
    raw: Option<&RawStandardize>,
    raw_columns: &[RawColumn],
    columns: &[Column],
    features: &[Feature],
) -> Result<Standardization, SchemaError> {
    let field = |c: usize, key: &str| format!("columns[{c}] '{}'.{key}", columns[c].name);
    let with = raw.map_or(RawWith::None, |s| s.with);
    let (provenance, epsilon) = (raw.and_then(|s| s.provenance.as_ref()), raw.and_then(|s| s.epsilon));
    if with != RawWith::Declared {
        if provenance.is_some() {
            return Err(invalid("standardize.provenance", "only applies with with = \"declared\"; remove it"));
        }
        if let Some((i, _)) = raw_columns.iter().enumerate().find(|(_, c)| c.mean.is_some() || c.std.is_some()) {
            return Err(invalid(
                field(i, "mean"),
                "declared statistics only apply with standardize.with = \"declared\"; set that or remove mean and std",
            ));
        }
    }
    if with != RawWith::Dp && epsilon.is_some() {
        return Err(invalid("standardize.epsilon", "only applies with with = \"dp\"; remove it"));
    }
    match with {
        RawWith::None => Ok(Standardization::None),
        RawWith::PerNode => Ok(Standardization::PerNodeTrain),
        RawWith::Dp => {
            let epsilon = epsilon.ok_or_else(|| {
                invalid(
                    "standardize.epsilon",
                    "is required with with = \"dp\": the ε each node spends on the statistics",
                )
            })?;
            if !(epsilon.is_finite() && epsilon > 0.0) {
                return Err(invalid("standardize.epsilon", "must be a finite number > 0"));
            }
            for (i, c) in columns.iter().enumerate().filter(|(_, c)| c.standardize) {
                let bounded = match c.kind {
                    ColumnKind::Numeric { min, max } => min.is_some() && max.is_some(),
                    ColumnKind::Integer { min, max } => min.is_some() && max.is_some(),
                    _ => true,
                };
                if !bounded {
                    return Err(invalid(
                        field(i, "min"),
                        "with standardize.with = \"dp\" every standardised column needs min and max (they bound one row's effect on the statistics)",
                    ));
                }
            }
            Ok(Standardization::Dp { epsilon })
        }
        RawWith::Declared => {
            let provenance = provenance.map(String::as_str).unwrap_or("");
            if provenance.trim().is_empty() {
                return Err(invalid(
                    "standardize.provenance",
                    "is required with with = \"declared\": say where the statistics come from",
                ));
            }
            check_len("standardize.provenance", provenance, MAX_PROSE)?;
            for (i, (rc, c)) in raw_columns.iter().zip(columns).enumerate() {
                if !c.standardize && (rc.mean.is_some() || rc.std.is_some()) {
                    return Err(invalid(
                        field(i, "mean"),
                        "the column is not standardised (standardize = false, or not numeric or integer), so it takes no mean or std; remove them",
                    ));
                }
                if c.standardize {
                    let mean = rc.mean.ok_or_else(|| {
                        invalid(
                            field(i, "mean"),
                            "is required for a standardised column with standardize.with = \"declared\"",
                        )
                    })?;
                    let std = rc.std.ok_or_else(|| {
                        invalid(
                            field(i, "std"),
                            "is required for a standardised column with standardize.with = \"declared\"",
                        )
                    })?;
                    if !mean.is_finite() {
                        return Err(invalid(field(i, "mean"), "must be a finite number"));
                    }
                    if !(std.is_finite() && std > 0.0) {
                        return Err(invalid(field(i, "std"), "must be a finite number > 0 (a node divides by it)"));
                    }
                }
            }
            let (mean, std) = features
                .iter()
                .map(|f| match (f.standardize, &raw_columns[f.column]) {
                    (true, RawColumn { mean: Some(m), std: Some(s), .. }) => (*m, *s),
                    _ => (0.0, 1.0),
                })
                .unzip();
            Ok(Standardization::Declared(DeclaredStatistics { mean, std, provenance: provenance.to_string() }))
        }
    }
}
