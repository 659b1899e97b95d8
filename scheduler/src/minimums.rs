//! The smallest sizes a tenant may ask for: below them its engine cannot start or its volume
//! cannot be made, so the request is refused at once, naming the field and the minimum, instead
//! of failing later on the node (in `mkfs`, in `initdb`, or as an engine killed for memory).
//! The figures for the built-in engines were measured (`t50`'s tenants at exactly these sizes
//! start and answer); an engine defined in an agent's config gets the generic floor.

use dormant_common::{Bytes, Resources};

/// What a tenant of one engine needs at least.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Minimum {
    pub memory: Bytes,
    pub storage: Bytes,
}

const MIB: u64 = 1 << 20;

/// The minimum for `engine`.
pub fn minimum(engine: &str) -> Minimum {
    match engine {
        // initdb's cluster and the first WAL segments; the postmaster with small buffers.
        "postgres" => Minimum {
            memory: Bytes(64 * MIB),
            storage: Bytes(64 * MIB),
        },
        // ext4's own metadata and journal on the volume; the generic floor for anything else.
        _ => Minimum {
            memory: Bytes(16 * MIB),
            storage: Bytes(16 * MIB),
        },
    }
}

/// Refuses `resources` below `engine`'s minimum, naming the field and the minimum.
pub fn check(engine: &str, resources: &Resources) -> Result<(), String> {
    let min = minimum(engine);
    for (field, asked, least) in [
        ("memory", resources.memory, min.memory),
        ("storage", resources.storage, min.storage),
    ] {
        if asked < least {
            return Err(format!(
                "{field}: {} asked, less than the {} a {engine} tenant needs at least",
                asked.human(),
                least.human()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dormant_common::MilliCpu;

    fn res(memory: u64, storage: u64) -> Resources {
        Resources {
            cpu: MilliCpu(100),
            memory: Bytes(memory),
            storage: Bytes(storage),
        }
    }

    #[test]
    fn sizes_below_the_engines_minimum_are_refused_naming_field_and_minimum() {
        assert_eq!(
            check("postgres", &res(1, 64 * MIB)).unwrap_err(),
            "memory: 1B asked, less than the 64MiB a postgres tenant needs at least"
        );
        assert_eq!(
            check("postgres", &res(64 * MIB, 1)).unwrap_err(),
            "storage: 1B asked, less than the 64MiB a postgres tenant needs at least"
        );
        assert_eq!(
            check("redis", &res(16 * MIB, 15 * MIB + 1)).unwrap_err(),
            "storage: 15.00MiB asked, less than the 16MiB a redis tenant needs at least"
        );
        assert!(check("postgres", &res(64 * MIB, 64 * MIB)).is_ok());
        assert!(check("my-engine", &res(16 * MIB, 16 * MIB)).is_ok());
    }
}
