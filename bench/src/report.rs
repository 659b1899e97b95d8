//! The results of a run, printed once at the end: a table for people, or one JSON object with
//! `--json`. Both carry the exact parameters the run used, defaults included.

use serde_json::{Map, Value};

#[derive(Debug)]
pub struct Report {
    benchmark: String,
    command_line: String,
    params: Vec<(String, Value)>,
    sections: Vec<Section>,
}

#[derive(Debug)]
struct Section {
    key: String,
    title: String,
    rows: Vec<Row>,
}

/// One figure: `label` and `text` for the table, `key` and `value` for JSON, so scripts get
/// stable snake_case keys and unrounded numbers.
#[derive(Debug)]
struct Row {
    label: String,
    key: String,
    text: String,
    value: Value,
}

impl Report {
    pub fn new(benchmark: &str) -> Self {
        Self {
            benchmark: benchmark.to_string(),
            command_line: std::env::args().collect::<Vec<_>>().join(" "),
            params: Vec::new(),
            sections: Vec::new(),
        }
    }

    pub fn param(&mut self, key: &str, value: impl Into<Value>) {
        self.params.push((key.to_string(), value.into()));
    }

    /// Starts a section; the rows that follow belong to it.
    pub fn section(&mut self, key: &str, title: &str) {
        self.sections.push(Section {
            key: key.to_string(),
            title: title.to_string(),
            rows: Vec::new(),
        });
    }

    /// A row shown as `label` and `text` in the table and stored as `key`: `value` in JSON.
    pub fn row(
        &mut self,
        label: &str,
        key: &str,
        text: impl Into<String>,
        value: impl Into<Value>,
    ) {
        if self.sections.is_empty() {
            self.section("results", "results");
        }
        if let Some(s) = self.sections.last_mut() {
            s.rows.push(Row {
                label: label.to_string(),
                key: key.to_string(),
                text: text.into(),
                value: value.into(),
            });
        }
    }

    pub fn to_json(&self) -> Value {
        let params: Map<String, Value> = self.params.iter().cloned().collect();
        let mut results = Map::new();
        for s in &self.sections {
            let rows: Map<String, Value> = s
                .rows
                .iter()
                .map(|r| (r.key.clone(), r.value.clone()))
                .collect();
            results.insert(s.key.clone(), Value::Object(rows));
        }
        serde_json::json!({
            "benchmark": self.benchmark,
            "command_line": self.command_line,
            "params": params,
            "results": results,
        })
    }

    pub fn to_table(&self) -> String {
        let width = self
            .sections
            .iter()
            .flat_map(|s| s.rows.iter().map(|r| r.label.chars().count()))
            .chain(self.params.iter().map(|(k, _)| k.len()))
            .max()
            .unwrap_or(0);
        let mut out = format!(
            "dormant-bench {}\ncommand: {}\n",
            self.benchmark, self.command_line
        );
        out.push_str("\nparameters\n");
        for (k, v) in &self.params {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push_str(&format!("  {k:<width$}  {v}\n"));
        }
        for s in &self.sections {
            out.push_str(&format!("\n{}\n", s.title));
            for r in &s.rows {
                out.push_str(&format!("  {:<width$}  {}\n", r.label, r.text));
            }
        }
        out
    }
}
