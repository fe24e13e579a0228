"""Synthetic DICOM files for tests: plain images, and images in which every
identifying attribute carries a unique marker string.

`write_marked_dicom` fills every attribute of the DICOM PS3.15 Annex E Basic
Application Level Confidentiality Profile (Table E.1-1) that pydicom's
dictionary knows, plus private tags and patient names inside (nested)
sequences, with a marker valid for the attribute's VR and unique across all
markers written: text VRs "MRK" + 4 digits, dates/times/UIDs/numbers digit
patterns that do not occur by chance. A de-identification test then searches
the output bytes for every marker. Binary numeric VRs (US, SS, UL, FL, FD, AT)
are set to nothing searchable and are skipped.
"""

from __future__ import annotations

import os

import numpy as np
import pydicom
from pydicom import datadict
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

# Table E.1-1, by keyword (retired attributes included). Keywords pydicom does
# not know, and the repeating-group overlay attributes, are handled apart.
ANNEX_E_KEYWORDS = """
AccessionNumber AcquisitionComments AcquisitionContextSequence AcquisitionDate
AcquisitionDateTime AcquisitionDeviceProcessingDescription AcquisitionFieldOfViewLabel
AcquisitionProtocolDescription AcquisitionTime AcquisitionUID ActualHumanPerformersSequence
AdditionalPatientHistory AddressTrial AdmissionID AdmittingDate AdmittingDiagnosesCodeSequence
AdmittingDiagnosesDescription AdmittingTime AffectedSOPInstanceUID Allergies Arbitrary
AuthorObserverSequence BranchOfService CassetteID ClinicalTrialCoordinatingCenterName
ClinicalTrialProtocolEthicsCommitteeApprovalNumber ClinicalTrialProtocolEthicsCommitteeName
ClinicalTrialProtocolID ClinicalTrialProtocolName ClinicalTrialSeriesDescription
ClinicalTrialSeriesID ClinicalTrialSiteID ClinicalTrialSiteName ClinicalTrialSponsorName
ClinicalTrialSubjectID ClinicalTrialSubjectReadingID ClinicalTrialTimePointDescription
ClinicalTrialTimePointID CommentsOnThePerformedProcedureStep ConcatenationUID
ConfidentialityConstraintOnPatientDataDescription ConsultingPhysicianName
ConsultingPhysicianIdentificationSequence ContainerComponentID ContainerDescription
ContainerIdentifier ContentCreatorName ContentCreatorIdentificationCodeSequence ContentDate
ContentSequence ContentTime ContextGroupExtensionCreatorUID ContrastBolusAgent
ContributionDateTime ContributionDescription CountryOfResidence CreatorVersionUID
CurrentObserverTrial CurrentPatientLocation CurveDate CurveTime CustodialOrganizationSequence
DataSetTrailingPadding DateOfDocumentOrVerbalTransactionTrial DateOfLastCalibration
DateOfLastDetectorCalibration DateOfSecondaryCapture DateTimeOfLastCalibration
DecompositionDescription DerivationDescription DetectorID DeviceAlternateIdentifier
DeviceDescription DeviceLabel DeviceSerialNumber DeviceSettingDescription DeviceUID
DigitalSignatureDateTime DigitalSignatureUID DigitalSignaturesSequence DimensionOrganizationUID
DischargeDiagnosisDescription DistributionAddress DistributionName DoseReferenceUID
EndAcquisitionDateTime EntityDescription EntityLabel EntityLongLabel EntityName EthnicGroup
ExclusionStartDateTime ExpectedCompletionDateTime FailedSOPInstanceUIDList FiducialUID
FillerOrderNumberImagingServiceRequest FindingsGroupRecordingDateTrial FirstTreatmentDate
FlowIdentifier FlowIdentifierSequence FractionGroupDescription FrameComments
FrameOfReferenceUID FrameOriginTimestamp GantryID GeneratorID GPSAltitude GPSDateStamp
GPSLatitude GPSLongitude GraphicAnnotationSequence HumanPerformerName
HumanPerformerOrganization IconImageSequence IdentifyingComments ImageComments
ImagePresentationComments ImagingServiceRequestComments Impressions InformationIssueDateTime
InstanceCoercionDateTime InstanceCreationDate InstanceCreationTime InstanceCreatorUID
InstanceOriginStatus InstitutionAddress InstitutionCodeSequence InstitutionName
InstitutionalDepartmentName InstitutionalDepartmentTypeCodeSequence
InsurancePlanIdentification IntendedRecipientsOfResultsIdentificationSequence
InterpretationApprovalDate InterpretationApprovalTime InterpretationApproverSequence
InterpretationAuthor InterpretationDiagnosisDescription InterpretationID
InterpretationIDIssuer InterpretationRecordedDate InterpretationRecordedTime
InterpretationRecorder InterpretationText InterpretationTranscriber
InterpretationTranscriptionDate InterpretationTranscriptionTime InterventionDrugStartTime
IrradiationEventUID IssueDateOfImagingServiceRequest IssueTimeOfImagingServiceRequest
IssuerOfAdmissionID IssuerOfAdmissionIDSequence IssuerOfPatientID IssuerOfServiceEpisodeID
IssuerOfServiceEpisodeIDSequence LargePaletteColorLookupTableUID LastMenstrualDate MAC
MediaStorageSOPInstanceUID MedicalAlerts MedicalRecordLocator MilitaryRank
ModifiedAttributesSequence ModifiedImageDescription ModifyingDeviceID
NameOfPhysiciansReadingStudy NamesOfIntendedRecipientsOfResults ObservationDateTrial
ObservationDateTime ObservationStartDateTime ObservationSubjectUIDTrial ObservationTimeTrial
ObservationUID Occupation OperatorIdentificationSequence OperatorsName
OrderCallbackPhoneNumber OrderCallbackTelecomInformation OrderEnteredBy OrderEntererLocation
OriginalAttributesSequence OtherPatientIDs OtherPatientIDsSequence OtherPatientNames
OverlayDate OverlayTime PaletteColorLookupTableUID ParticipantSequence ParticipationDateTime
PatientAddress PatientAge PatientBirthDate PatientBirthName PatientBirthTime PatientComments
PatientID PatientInstitutionResidence PatientInsurancePlanCodeSequence PatientMotherBirthName
PatientName PatientPrimaryLanguageCodeSequence PatientPrimaryLanguageModifierCodeSequence
PatientReligiousPreference PatientSex PatientSexNeutered PatientSize PatientState
PatientTelecomInformation PatientTelephoneNumbers PatientTransportArrangements PatientWeight
PerformedLocation PerformedProcedureStepDescription PerformedProcedureStepEndDate
PerformedProcedureStepEndDateTime PerformedProcedureStepEndTime PerformedProcedureStepID
PerformedProcedureStepStartDate PerformedProcedureStepStartDateTime
PerformedProcedureStepStartTime PerformedStationAETitle
PerformedStationGeographicLocationCodeSequence PerformedStationName
PerformedStationNameCodeSequence PerformingPhysicianIdentificationSequence
PerformingPhysicianName PersonAddress PersonIdentificationCodeSequence PersonName
PersonTelecomInformation PersonTelephoneNumbers PhysicianApprovingInterpretation
PhysiciansReadingStudyIdentificationSequence PhysiciansOfRecord
PhysiciansOfRecordIdentificationSequence PlacerOrderNumberImagingServiceRequest PlateID
PreMedication PregnancyStatus PresentationCreationDate PresentationCreationTime
ProcedureStepCancellationDateTime ProductExpirationDateTime ProtocolName
RadiopharmaceuticalStartDateTime RadiopharmaceuticalStartTime
RadiopharmaceuticalStopDateTime RadiopharmaceuticalStopTime ReasonForOmissionDescription
ReasonForRequestedProcedureCodeSequence ReasonForStudy ReasonForTheImagingServiceRequest
ReasonForTheRequestedProcedure ReasonForVisit ReceivingAE RecordedRTControlPointDateTime
ReferencedDigitalSignatureSequence ReferencedFrameOfReferenceUID
ReferencedGeneralPurposeScheduledProcedureStepTransactionUID ReferencedImageSequence
ReferencedObservationUIDTrial ReferencedPatientAliasSequence ReferencedPatientPhotoSequence
ReferencedPatientSequence ReferencedPerformedProcedureStepSequence
ReferencedSOPInstanceMACSequence ReferencedSOPInstanceUID ReferencedSOPInstanceUIDInFile
ReferencedStudySequence ReferencedTreatmentRecordSequence ReferringPhysicianAddress
ReferringPhysicianIdentificationSequence ReferringPhysicianName
ReferringPhysicianTelephoneNumbers RegionOfResidence RelatedFrameOfReferenceUID
RequestAttributesSequence RequestedContrastAgent RequestedProcedureComments
RequestedProcedureDescription RequestedProcedureID RequestedProcedureLocation
RequestedSeriesDescription RequestedSOPInstanceUID RequestingAE RequestingPhysician
RequestingService RequestingServiceCodeSequence
RespiratoryMotionCompensationTechniqueDescription ResponsibleOrganization ResponsiblePerson
ResponsiblePersonRole ResultsComments ResultsDistributionListSequence ResultsIDIssuer
ReviewDate ReviewTime ReviewerName RTPlanDate RTPlanTime ScheduledAdmissionDate
ScheduledAdmissionTime ScheduledDischargeDate ScheduledDischargeTime
ScheduledHumanPerformersSequence ScheduledPatientInstitutionResidence
ScheduledPerformingPhysicianIdentificationSequence ScheduledPerformingPhysicianName
ScheduledProcedureStepDescription ScheduledProcedureStepEndDate ScheduledProcedureStepEndTime
ScheduledProcedureStepExpirationDateTime ScheduledProcedureStepID
ScheduledProcedureStepLocation ScheduledProcedureStepModificationDateTime
ScheduledProcedureStepStartDate ScheduledProcedureStepStartDateTime
ScheduledProcedureStepStartTime ScheduledStationAETitle
ScheduledStationGeographicLocationCodeSequence ScheduledStationName
ScheduledStationNameCodeSequence ScheduledStudyLocation ScheduledStudyLocationAETitle
SecondaryReviewDate SecondaryReviewTime SecondaryReviewerName SeriesDate SeriesDescription
SeriesInstanceUID SeriesTime ServiceEpisodeDescription ServiceEpisodeID SmokingStatus
SOPInstanceUID SourceEndDateTime SourceImageSequence SourceManufacturer SourceSerialNumber
SourceStartDateTime SpecialNeeds SpecimenAccessionNumber SpecimenDetailedDescription
SpecimenIdentifier SpecimenPreparationSequence SpecimenShortDescription SpecimenUID
StartAcquisitionDateTime StationName StorageMediaFileSetUID StudyArrivalDate StudyArrivalTime
StudyComments StudyCompletionDate StudyCompletionTime StudyDate StudyDescription StudyID
StudyIDIssuer StudyInstanceUID StudyReadDate StudyReadTime StudyTime StudyVerifiedDate
StudyVerifiedTime SubstanceAdministrationDateTime SynchronizationFrameOfReferenceUID TargetUID
TelephoneNumberTrial TemplateExtensionCreatorUID TemplateExtensionOrganizationUID TextComments
TextString TimeOfDocumentCreationOrVerbalTransactionTrial TimeOfLastCalibration
TimeOfSecondaryCapture TimezoneOffsetFromUTC TopicAuthor TopicKeywords TopicSubject TopicTitle
TrackingUID TransactionUID TreatmentControlPointDate TreatmentControlPointTime TreatmentDate
TreatmentTime UID UniqueDeviceIdentifier VerbalSourceTrial
VerbalSourceIdentifierCodeSequenceTrial VerifyingObserverIdentificationCodeSequence
VerifyingObserverName VerifyingObserverSequence VerifyingOrganization VisitComments
XRayDetectorID XRayDetectorLabel XRaySourceID
""".split()  # noqa: SIM905  (a word list reads better than 400 quoted strings)

_TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"}
_BINARY_VRS = {"OB", "OW", "UN", "OB or OW"}


def annex_e_keywords() -> list[str]:
    """Table E.1-1 keywords that pydicom's dictionary knows and a file can hold
    (the command-set ones, group 0000, only occur in network messages)."""
    tags = {k: datadict.tag_for_keyword(k) for k in ANNEX_E_KEYWORDS}
    return [k for k, tag in tags.items() if tag is not None and tag >> 16 != 0]


def gradient(rows: int = 32, cols: int = 32, seed: int = 0) -> np.ndarray:
    """A uint16 test image: a diagonal ramp plus a seed-dependent offset, never constant."""
    y, x = np.mgrid[:rows, :cols]
    return (100 * (x + y) + 37 * seed + 500).astype(np.uint16)


def image_dataset(
    pixels: np.ndarray,
    *,
    modality: str = "CR",
    patient_id: str | None = None,
    sop_class: str = CR_IMAGE_STORAGE,
    pixel_spacing: tuple[float, float] | None = None,
) -> Dataset:
    """A minimal valid monochrome image dataset (uncompressed, MONOCHROME2).
    `pixels`: (H, W) or (frames, H, W), stored 8-bit if uint8 (e.g. a mask), else
    as uint16."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        pixels = pixels.astype(np.uint16)
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = sop_class
    file_meta.MediaStorageSOPInstanceUID = generate_uid()
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.ManufacturerModelName = "FixtureModel"
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.PixelData = pixels.tobytes()
    return ds


def save(ds: Dataset, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_image_dicom(path: str | os.PathLike, pixels: np.ndarray | None = None, **kw) -> str:
    """A plain valid image DICOM file (see `image_dataset`); returns the path."""
    return save(image_dataset(gradient() if pixels is None else pixels, **kw), path)


class _Markers:
    """Unique marker values per VR; `file_index` keeps files apart (0..9)."""

    def __init__(self, file_index: int):
        if not 0 <= file_index <= 9:
            raise ValueError("file_index must be 0..9")
        self.file_index = file_index
        self.count = 0
        self.per_vr: dict[str, int] = {}
        self.values: dict[str, str] = {}  # where -> marker

    def __call__(self, where: str, vr: str) -> str | bytes | None:
        n = self.file_index * 1000 + self.count  # unique across files and within one
        self.count += 1
        k = self.per_vr.get(vr, 0)  # dates and times count per VR to stay valid
        self.per_vr[vr] = k + 1
        f = self.file_index
        if vr in _TEXT_VRS:
            value = f"MRK{n:04d}"
        elif vr == "DA":  # year 1871 + file, day-of-year from k
            value = f"{1871 + f}{1 + k // 28:02d}{1 + k % 28:02d}"
        elif vr == "DT":
            value = f"{1901 + f}{1 + k // 28:02d}{1 + k % 28:02d}193746.{n:06d}"
        elif vr == "TM":
            value = f"{13 + f:02d}{k // 60:02d}{k % 60:02d}.{n:06d}"
        elif vr == "UI":
            value = f"2.25.6029{n:05d}1733"
        elif vr == "DS":
            value = f"-7{n:04d}.0913"
        elif vr == "IS":
            value = f"-3{n:05d}9"
        elif vr == "AS":
            value = f"{f:02d}9W"
        elif vr in _BINARY_VRS:
            self.values[where] = f"MRK{n:04d}"
            return f"MRK{n:04d} ".encode()  # even length
        else:
            return None  # binary numbers: nothing searchable
        self.values[where] = value
        return value


def _vr_of(keyword: str) -> str:
    vr = datadict.dictionary_VR(datadict.tag_for_keyword(keyword))
    return {"US or SS": "US", "OB or OW": "OB", "US or SS or OW": "US"}.get(vr, vr)


def _marked_item(markers: _Markers, where: str, depth: int) -> Dataset:
    """A sequence item with a patient name and a code meaning (and, one level
    down, another sequence) carrying markers."""
    item = Dataset()
    item.PatientName = markers(f"{where}>PatientName", "PN")
    item.CodeMeaning = markers(f"{where}>CodeMeaning", "LO")
    if depth > 0:
        inner = _marked_item(markers, f"{where}>ReferencedPatientSequence", depth - 1)
        item.ReferencedPatientSequence = Sequence([inner])
    return item


def marked_dataset(
    file_index: int = 0, pixels: np.ndarray | None = None, with_pixels: bool = True
) -> tuple[Dataset, dict[str, str]]:
    """(dataset, {where: marker}) for an image whose every Table E.1-1 attribute,
    private tags, overlay comments and nested patient names carry unique markers."""
    markers = _Markers(file_index)
    ds = image_dataset(gradient(seed=file_index) if pixels is None else pixels)
    for i, keyword in enumerate(annex_e_keywords()):
        vr = _vr_of(keyword)
        if keyword == "MediaStorageSOPInstanceUID":
            continue  # the file meta copy of SOPInstanceUID; pydicom writes it from there
        if keyword == "SOPInstanceUID":
            ds.SOPInstanceUID = markers(keyword, "UI")
        elif vr == "SQ":
            # Every third sequence nests a second level.
            ds.add_new(keyword, "SQ", Sequence([_marked_item(markers, keyword, i % 3 == 0)]))
        else:
            value = markers(keyword, vr)
            if value is not None:
                ds.add_new(keyword, vr, value)
    # Repeating-group overlay comments (60xx,4000) and private tags.
    ds.add_new(0x60004000, "LT", markers("OverlayComments", "LT"))
    ds.add_new(0x00090010, "LO", markers("private creator 0009", "LO"))
    ds.add_new(0x00091001, "LO", markers("private 0009,1001", "LO"))
    ds.add_new(0x00091002, "PN", markers("private 0009,1002", "PN"))
    ds.add_new(0x00091003, "UN", markers("private 0009,1003", "UN"))
    item = Dataset()
    item.add_new(0x00110010, "LO", markers("private creator 0011 in item", "LO"))
    item.add_new(0x00111001, "PN", markers("private 0011,1001 in item", "PN"))
    ds.add_new(0x00091004, "SQ", Sequence([item]))
    if not with_pixels:
        del ds.PixelData
    values = markers.values
    assert len(set(values.values())) == len(values), "markers must be unique"
    return ds, values


def write_marked_dicom(
    path: str | os.PathLike, file_index: int = 0, with_pixels: bool = True
) -> dict[str, str]:
    """Writes `marked_dataset(file_index)` to `path`; returns {where: marker}."""
    ds, values = marked_dataset(file_index, with_pixels=with_pixels)
    save(ds, path)
    return values


def read_back(path: str | os.PathLike) -> Dataset:
    return pydicom.dcmread(os.fspath(path))
