//! The FHIR words a log may repeat: resource type names, the REST keywords that appear as path
//! segments, and operation names. Route templates ([`super::classify::route_template`]) keep a path
//! segment only when it is one of these words; anything else a client put in a path (an id, a name,
//! an e-mail address, a misspelt type) becomes a placeholder, because a path segment is client text
//! and client text may be PHI.
//!
//! The lists are closed on purpose: a word missing here costs an operator a less precise template
//! (`{other}`), while a word kept that should not be leaks a patient's data into the audit log.

/// Resource types of FHIR R4 (4.0.1, <http://hl7.org/fhir/R4/resourcelist.html>), plus the DSTU2 and
/// STU3 names that R4 renamed or dropped (the Teams interface articles use DSTU2's
/// `MedicationOrder`; `Conformance` is DSTU2's CapabilityStatement). Sorted, for binary search.
const RESOURCE_TYPES: &[&str] = &[
    "Account",
    "ActivityDefinition",
    "AdverseEvent",
    "AllergyIntolerance",
    "Appointment",
    "AppointmentResponse",
    "AuditEvent",
    "Basic",
    "Binary",
    "BiologicallyDerivedProduct",
    "BodySite",
    "BodyStructure",
    "Bundle",
    "CapabilityStatement",
    "CarePlan",
    "CareTeam",
    "CatalogEntry",
    "ChargeItem",
    "ChargeItemDefinition",
    "Claim",
    "ClaimResponse",
    "ClinicalImpression",
    "CodeSystem",
    "Communication",
    "CommunicationRequest",
    "CompartmentDefinition",
    "Composition",
    "ConceptMap",
    "Condition",
    "Conformance",
    "Consent",
    "Contract",
    "Coverage",
    "CoverageEligibilityRequest",
    "CoverageEligibilityResponse",
    "DataElement",
    "DetectedIssue",
    "Device",
    "DeviceComponent",
    "DeviceDefinition",
    "DeviceMetric",
    "DeviceRequest",
    "DeviceUseRequest",
    "DeviceUseStatement",
    "DiagnosticOrder",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "EffectEvidenceSynthesis",
    "EligibilityRequest",
    "EligibilityResponse",
    "Encounter",
    "Endpoint",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "EpisodeOfCare",
    "EventDefinition",
    "Evidence",
    "EvidenceVariable",
    "ExampleScenario",
    "ExpansionProfile",
    "ExplanationOfBenefit",
    "FamilyMemberHistory",
    "Flag",
    "Goal",
    "GraphDefinition",
    "Group",
    "GuidanceResponse",
    "HealthcareService",
    "ImagingManifest",
    "ImagingObjectSelection",
    "ImagingStudy",
    "Immunization",
    "ImmunizationEvaluation",
    "ImmunizationRecommendation",
    "ImplementationGuide",
    "InsurancePlan",
    "Invoice",
    "Library",
    "Linkage",
    "List",
    "Location",
    "Measure",
    "MeasureReport",
    "Media",
    "Medication",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationKnowledge",
    "MedicationOrder",
    "MedicationRequest",
    "MedicationStatement",
    "MedicinalProduct",
    "MedicinalProductAuthorization",
    "MedicinalProductContraindication",
    "MedicinalProductIndication",
    "MedicinalProductIngredient",
    "MedicinalProductInteraction",
    "MedicinalProductManufactured",
    "MedicinalProductPackaged",
    "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect",
    "MessageDefinition",
    "MessageHeader",
    "MolecularSequence",
    "NamingSystem",
    "NutritionOrder",
    "Observation",
    "ObservationDefinition",
    "OperationDefinition",
    "OperationOutcome",
    "Order",
    "OrderResponse",
    "Organization",
    "OrganizationAffiliation",
    "Parameters",
    "Patient",
    "PaymentNotice",
    "PaymentReconciliation",
    "Person",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
    "ProcedureRequest",
    "ProcessRequest",
    "ProcessResponse",
    "Provenance",
    "Questionnaire",
    "QuestionnaireResponse",
    "ReferralRequest",
    "RelatedPerson",
    "RequestGroup",
    "ResearchDefinition",
    "ResearchElementDefinition",
    "ResearchStudy",
    "ResearchSubject",
    "RiskAssessment",
    "RiskEvidenceSynthesis",
    "Schedule",
    "SearchParameter",
    "Sequence",
    "ServiceDefinition",
    "ServiceRequest",
    "Slot",
    "Specimen",
    "SpecimenDefinition",
    "StructureDefinition",
    "StructureMap",
    "Subscription",
    "Substance",
    "SubstanceNucleicAcid",
    "SubstancePolymer",
    "SubstanceProtein",
    "SubstanceReferenceInformation",
    "SubstanceSourceMaterial",
    "SubstanceSpecification",
    "SupplyDelivery",
    "SupplyRequest",
    "Task",
    "TerminologyCapabilities",
    "TestReport",
    "TestScript",
    "ValueSet",
    "VerificationResult",
    "VisionPrescription",
];

/// Path keywords of the FHIR RESTful API (R4 §3.1.0, <http://hl7.org/fhir/R4/http.html>):
/// `[base]/metadata`, `[type]/_search`, `[type]/[id]/_history/[vid]`. Sorted.
const KEYWORDS: &[&str] = &["_history", "_search", "metadata"];

/// Operation names (`$name`) defined by FHIR R4 (<http://hl7.org/fhir/R4/operationslist.html>), plus
/// the bulk-data `$export` and the ones common servers add (HAPI's `$expunge`, `$reindex`,
/// Da Vinci's `$member-match`). Sorted.
const OPERATIONS: &[&str] = &[
    "$apply",
    "$care-gaps",
    "$closure",
    "$collect-data",
    "$conforms",
    "$convert",
    "$data-requirements",
    "$document",
    "$evaluate-measure",
    "$everything",
    "$expand",
    "$export",
    "$expunge",
    "$find",
    "$graph",
    "$graphql",
    "$implements",
    "$lastn",
    "$lookup",
    "$match",
    "$member-match",
    "$meta",
    "$meta-add",
    "$meta-delete",
    "$populate",
    "$populatehtml",
    "$populatelink",
    "$process-message",
    "$questionnaire",
    "$reindex",
    "$snapshot",
    "$stats",
    "$submit-data",
    "$subsumes",
    "$transform",
    "$translate",
    "$validate",
    "$validate-code",
    "$versions",
];

fn listed(list: &'static [&'static str], segment: &[u8]) -> Option<&'static str> {
    let i = list.binary_search_by(|w| w.as_bytes().cmp(segment)).ok()?;
    list.get(i).copied()
}

/// A resource type name, as listed (its own `&'static str`, so a template never copies client bytes).
pub fn resource_type(segment: &[u8]) -> Option<&'static str> {
    listed(RESOURCE_TYPES, segment)
}

/// A REST keyword (`_search`, `_history`, `metadata`) or an operation name (`$everything`, …).
pub fn keyword_or_operation(segment: &[u8]) -> Option<&'static str> {
    listed(KEYWORDS, segment).or_else(|| listed(OPERATIONS, segment))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lists_are_sorted_and_unique() {
        for list in [RESOURCE_TYPES, KEYWORDS, OPERATIONS] {
            assert!(list.windows(2).all(|w| w[0].as_bytes() < w[1].as_bytes()));
        }
        // R4 has 145 resource types; the rest are DSTU2/STU3 names.
        assert!(RESOURCE_TYPES.len() >= 145, "{}", RESOURCE_TYPES.len());
    }

    #[test]
    fn words_are_found_exactly() {
        assert_eq!(resource_type(b"Patient"), Some("Patient"));
        assert_eq!(resource_type(b"MedicationOrder"), Some("MedicationOrder"));
        assert_eq!(resource_type(b"patient"), None);
        assert_eq!(resource_type(b"Smith"), None);
        assert_eq!(keyword_or_operation(b"_search"), Some("_search"));
        assert_eq!(keyword_or_operation(b"$everything"), Some("$everything"));
        assert_eq!(keyword_or_operation(b"_john.smith@x.org"), None);
        assert_eq!(keyword_or_operation(b"$Everything"), None);
    }
}
