//! Values of configuration keys that the stages act on (each stage reads
//! its section; these are the words it is given).

/// `[cdc] schema_changes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaChanges {
    Apply,
    Halt,
}

/// `[conflict] resolution_strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    LastWriteWins,
    #[default]
    SourcePreferred,
    TargetPreferred,
    VectorClock,
}

impl Strategy {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "LastWriteWins" => Self::LastWriteWins,
            "SourcePreferred" => Self::SourcePreferred,
            "TargetPreferred" => Self::TargetPreferred,
            "VectorClock" => Self::VectorClock,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::LastWriteWins => "LastWriteWins",
            Self::SourcePreferred => "SourcePreferred",
            Self::TargetPreferred => "TargetPreferred",
            Self::VectorClock => "VectorClock",
        }
    }
}

/// This host's name (for the apply node's logs and the default node id).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}
