//! The operations of the KMS service model, and which of them change tags or aliases.

/// The `X-Amz-Target` prefix of every KMS operation (the model's `targetPrefix`).
pub const TARGET_PREFIX: &str = "TrentService.";

/// The operations the proxy reads and judges: those whose input can set or remove tags (every
/// input shape with a `TagList` or `TagKeyList` member in `kms-service-2.json`), and those that
/// create, repoint or delete an alias (every input shape with an `AliasNameType` member). Aliases
/// grant access as tags do (`kms:ResourceAliases` in IAM policies), so both are judged alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TagOperation {
    TagResource,
    UntagResource,
    CreateKey,
    ReplicateKey,
    CreateAlias,
    UpdateAlias,
    DeleteAlias,
}

impl TagOperation {
    pub const ALL: [TagOperation; 7] = [
        TagOperation::TagResource,
        TagOperation::UntagResource,
        TagOperation::CreateKey,
        TagOperation::ReplicateKey,
        TagOperation::CreateAlias,
        TagOperation::UpdateAlias,
        TagOperation::DeleteAlias,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TagOperation::TagResource => "TagResource",
            TagOperation::UntagResource => "UntagResource",
            TagOperation::CreateKey => "CreateKey",
            TagOperation::ReplicateKey => "ReplicateKey",
            TagOperation::CreateAlias => "CreateAlias",
            TagOperation::UpdateAlias => "UpdateAlias",
            TagOperation::DeleteAlias => "DeleteAlias",
        }
    }

    pub fn from_name(name: &str) -> Option<TagOperation> {
        TagOperation::ALL.into_iter().find(|op| op.name() == name)
    }

    /// Whether the operation names a key in `KeyId` (TagResource, UntagResource, ReplicateKey;
    /// CreateKey makes a new one, the alias operations name theirs in `TargetKeyId`).
    pub fn has_key_id(self) -> bool {
        matches!(
            self,
            TagOperation::TagResource | TagOperation::UntagResource | TagOperation::ReplicateKey
        )
    }

    /// Whether the operation creates, repoints or deletes an alias.
    pub fn is_alias(self) -> bool {
        matches!(
            self,
            TagOperation::CreateAlias | TagOperation::UpdateAlias | TagOperation::DeleteAlias
        )
    }

    /// Whether the operation names the key an alias points at (`TargetKeyId`): CreateAlias and
    /// UpdateAlias.
    pub fn has_target_key_id(self) -> bool {
        matches!(self, TagOperation::CreateAlias | TagOperation::UpdateAlias)
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
    fn the_judged_operations_are_those_whose_input_holds_tags_or_an_alias_name() {
        // Every input shape of the model with a member of shape TagList, TagKeyList or
        // AliasNameType names an operation the proxy judges, and no other operation is judged.
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/kms-service-2.json");
        let model: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(model).unwrap()).unwrap();
        let mut judged: Vec<&str> = model["operations"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, op)| {
                let Some(input) = op["input"]["shape"].as_str() else {
                    return false;
                };
                model["shapes"][input]["members"]
                    .as_object()
                    .unwrap()
                    .values()
                    .any(|m| {
                        matches!(
                            m["shape"].as_str(),
                            Some("TagList" | "TagKeyList" | "AliasNameType")
                        )
                    })
            })
            .map(|(name, _)| name.as_str())
            .collect();
        judged.sort_unstable();
        let mut ours: Vec<&str> = TagOperation::ALL.iter().map(|op| op.name()).collect();
        ours.sort_unstable();
        assert_eq!(judged, ours);
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
