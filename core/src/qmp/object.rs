//! QOM objects: `object-add` (TLS credentials, secrets) and `object-del`.

use std::collections::BTreeMap;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::fields::take_required;

/// Which side of a TLS connection credentials are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsEndpoint {
    /// Client side.
    Client,
    /// Server side (an NBD server).
    Server,
}

/// Properties of a `tls-creds-x509` object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TlsCredsX509 {
    /// The object's id.
    pub id: String,
    /// Directory holding `ca-cert.pem`, `server-cert.pem`, `server-key.pem`...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Client or server credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<TlsEndpoint>,
    /// Require and verify the peer's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_peer: Option<bool>,
    /// Check the certificates when loading them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sanity_check: Option<bool>,
    /// Id of a `secret` object holding the private key's password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passwordid: Option<String>,
    /// GnuTLS priority string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
}

/// Encoding of a secret's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretFormat {
    /// Verbatim bytes.
    Raw,
    /// Base64.
    Base64,
}

/// Properties of a `secret` object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Secret {
    /// The object's id.
    pub id: String,
    /// The secret itself (possibly encrypted with `keyid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// A file holding the secret instead of `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Encoding of `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<SecretFormat>,
    /// Id of the secret that encrypts this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyid: Option<String>,
    /// Initialization vector of the encryption (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iv: Option<String>,
}

/// Arguments of `object-add`: one flat object tagged by `qom-type`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectAdd {
    /// `qom-type: tls-creds-x509`.
    TlsCredsX509(TlsCredsX509),
    /// `qom-type: secret`.
    Secret(Secret),
    /// Any other type, properties verbatim.
    Other {
        /// The QOM type name.
        qom_type: String,
        /// The object's id.
        id: String,
        /// Its other properties.
        props: BTreeMap<String, Value>,
    },
}

impl ObjectAdd {
    /// The QOM type name.
    pub fn qom_type(&self) -> &str {
        match self {
            ObjectAdd::TlsCredsX509(_) => "tls-creds-x509",
            ObjectAdd::Secret(_) => "secret",
            ObjectAdd::Other { qom_type, .. } => qom_type,
        }
    }

    /// The object's id.
    pub fn id(&self) -> &str {
        match self {
            ObjectAdd::TlsCredsX509(creds) => &creds.id,
            ObjectAdd::Secret(secret) => &secret.id,
            ObjectAdd::Other { id, .. } => id,
        }
    }
}

/// `qom-type` followed by the object's properties, in their declaration order.
#[derive(Serialize)]
struct QomTypeThen<'a, T: Serialize> {
    #[serde(rename = "qom-type")]
    qom_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(flatten)]
    props: &'a T,
}

impl Serialize for ObjectAdd {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let qom_type = self.qom_type();
        match self {
            ObjectAdd::TlsCredsX509(props) => QomTypeThen {
                qom_type,
                id: None,
                props,
            }
            .serialize(serializer),
            ObjectAdd::Secret(props) => QomTypeThen {
                qom_type,
                id: None,
                props,
            }
            .serialize(serializer),
            ObjectAdd::Other { id, props, .. } => QomTypeThen {
                qom_type,
                id: Some(id),
                props,
            }
            .serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for ObjectAdd {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut map = Map::<String, Value>::deserialize(deserializer)?;
        let qom_type: String = take_required(&mut map, "qom-type").map_err(D::Error::custom)?;
        Ok(match qom_type.as_str() {
            "tls-creds-x509" => ObjectAdd::TlsCredsX509(
                serde_json::from_value(Value::Object(map)).map_err(D::Error::custom)?,
            ),
            "secret" => ObjectAdd::Secret(
                serde_json::from_value(Value::Object(map)).map_err(D::Error::custom)?,
            ),
            _ => {
                let id: String = take_required(&mut map, "id").map_err(D::Error::custom)?;
                ObjectAdd::Other {
                    qom_type,
                    id,
                    props: map.into_iter().collect(),
                }
            }
        })
    }
}

/// Arguments of `object-del`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectDel {
    /// The object's id.
    pub id: String,
}
