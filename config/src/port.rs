//! The Service port of a `service` backend: a name (`http`) or a number (`8080`).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A Kubernetes Service port, by name or by number, as Gateway API and Services write it.
///
/// Written by hand rather than as an untagged enum so that the CRD schema is
/// Kubernetes' own int-or-string.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ServicePort {
    /// The port's number.
    Number(u32),
    /// The port's name in the Service.
    Name(String),
}

impl fmt::Display for ServicePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServicePort::Number(n) => write!(f, "{n}"),
            ServicePort::Name(s) => write!(f, "{s:?}"),
        }
    }
}

impl Serialize for ServicePort {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ServicePort::Number(n) => s.serialize_u32(*n),
            ServicePort::Name(name) => s.serialize_str(name),
        }
    }
}

impl<'de> Deserialize<'de> for ServicePort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ServicePort;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port name or number")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ServicePort, E> {
                // Out-of-range numbers are kept and refused by the validator with the range.
                Ok(ServicePort::Number(u32::try_from(v).unwrap_or(u32::MAX)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ServicePort, E> {
                Ok(ServicePort::Number(u32::try_from(v).unwrap_or(0)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ServicePort, E> {
                Ok(ServicePort::Name(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Kubernetes' int-or-string, as a Service's `targetPort` is described.
#[cfg(feature = "crd")]
impl schemars::JsonSchema for ServicePort {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ServicePort".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "x-kubernetes-int-or-string": true,
            "description": "A Service port name (\"http\") or number (8080)."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_a_name_or_a_number() {
        let n: ServicePort = serde_yaml::from_str("8080").unwrap();
        assert_eq!(n, ServicePort::Number(8080));
        let s: ServicePort = serde_yaml::from_str("http").unwrap();
        assert_eq!(s, ServicePort::Name("http".into()));
        assert_eq!(serde_yaml::to_string(&n).unwrap(), "8080\n");
        assert_eq!(serde_yaml::to_string(&s).unwrap(), "http\n");
        assert!(serde_yaml::from_str::<ServicePort>("[1]").is_err());
    }
}
