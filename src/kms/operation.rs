//! The operations of the KMS service model, and which of them change tags.

/// The `X-Amz-Target` prefix of every KMS operation (the model's `targetPrefix`).
pub const TARGET_PREFIX: &str = "TrentService.";

/// The operations whose input can set or remove tags (every input shape with a `TagList` or
/// `TagKeyList` member in `kms-service-2.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TagOperation {
    TagResource,
    UntagResource,
    CreateKey,
    ReplicateKey,
}

impl TagOperation {
    pub const ALL: [TagOperation; 4] = [
        TagOperation::TagResource,
        TagOperation::UntagResource,
        TagOperation::CreateKey,
        TagOperation::ReplicateKey,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TagOperation::TagResource => "TagResource",
            TagOperation::UntagResource => "UntagResource",
            TagOperation::CreateKey => "CreateKey",
            TagOperation::ReplicateKey => "ReplicateKey",
        }
    }

    pub fn from_name(name: &str) -> Option<TagOperation> {
        TagOperation::ALL.into_iter().find(|op| op.name() == name)
    }

    /// Whether the operation names a key in `KeyId` (CreateKey makes a new one).
    pub fn has_key_id(self) -> bool {
        !matches!(self, TagOperation::CreateKey)
    }
}

impl std::fmt::Display for TagOperation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// All 54 operations of the KMS model (`operations` in `kms-service-2.json`), sorted so that a
/// lookup is a binary search.
pub const OPERATIONS: [&str; 54] = [
    "CancelKeyDeletion",
    "ConnectCustomKeyStore",
    "CreateAlias",
    "CreateCustomKeyStore",
    "CreateGrant",
    "CreateKey",
    "Decrypt",
    "DeleteAlias",
    "DeleteCustomKeyStore",
    "DeleteImportedKeyMaterial",
    "DeriveSharedSecret",
    "DescribeCustomKeyStores",
    "DescribeKey",
    "DisableKey",
    "DisableKeyRotation",
    "DisconnectCustomKeyStore",
    "EnableKey",
    "EnableKeyRotation",
    "Encrypt",
    "GenerateDataKey",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateMac",
    "GenerateRandom",
    "GetKeyLastUsage",
    "GetKeyPolicy",
    "GetKeyRotationStatus",
    "GetParametersForImport",
    "GetPublicKey",
    "ImportKeyMaterial",
    "ListAliases",
    "ListGrants",
    "ListKeyPolicies",
    "ListKeyRotations",
    "ListKeys",
    "ListResourceTags",
    "ListRetirableGrants",
    "PutKeyPolicy",
    "ReEncrypt",
    "ReplicateKey",
    "RetireGrant",
    "RevokeGrant",
    "RotateKeyOnDemand",
    "ScheduleKeyDeletion",
    "Sign",
    "TagResource",
    "UntagResource",
    "UpdateAlias",
    "UpdateCustomKeyStore",
    "UpdateKeyDescription",
    "UpdatePrimaryRegion",
    "Verify",
    "VerifyMac",
];

/// An operation of the KMS model, by its model name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Operation(&'static str);

impl Operation {
    /// The operation whose model name is exactly `name`.
    pub fn from_name(name: &str) -> Option<Operation> {
        OPERATIONS
            .binary_search(&name)
            .ok()
            .map(|i| Operation(OPERATIONS[i]))
    }

    pub fn name(self) -> &'static str {
        self.0
    }

    pub fn tag_operation(self) -> Option<TagOperation> {
        TagOperation::from_name(self.0)
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_sorted_and_unique_so_binary_search_works() {
        assert!(OPERATIONS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn every_tag_operation_is_a_model_operation() {
        for op in TagOperation::ALL {
            let found = Operation::from_name(op.name()).expect("in the model");
            assert_eq!(found.tag_operation(), Some(op));
        }
        assert_eq!(
            Operation::from_name("Encrypt").unwrap().tag_operation(),
            None
        );
        assert_eq!(Operation::from_name("encrypt"), None);
    }

    #[test]
    fn the_list_matches_the_shipped_service_model() {
        // The list above was generated from this copy of the AWS model.
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/kms-service-2.json");
        let text = std::fs::read_to_string(&model)
            .unwrap_or_else(|e| panic!("the KMS service model {}: {e}", model.display()));
        let model: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut names: Vec<&str> = model["operations"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        assert_eq!(names, OPERATIONS.to_vec());
    }
}
