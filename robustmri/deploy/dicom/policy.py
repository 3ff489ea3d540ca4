"""The rules a DICOM series is held to: tolerances, the attributes compared, and the policies in words
(reports and ``summary.json`` quote :data:`GROUPING_POLICY`; :mod:`.integrity` applies them)."""
#: Orientation cosines that differ by more than this make "position along one normal" meaningless.
ORIENTATION_TOLERANCE = 1e-3
#: PixelSpacing values whose relative difference exceeds this are different geometries.
PIXEL_SPACING_TOLERANCE = 1e-3
#: Slices whose positions along the normal differ by at most this (mm) are at one position.
DUPLICATE_POSITION_TOLERANCE_MM = 1e-3
#: A step between consecutive positions above this many times the median step means missing slice(s).
GAP_FACTOR = 1.5
#: Attributes on which files sharing a SeriesInstanceUID must agree, or the SeriesInstanceUID is refused.
IDENTITY_ATTRIBUTES = ("PatientID", "StudyInstanceUID", "Modality")
#: Attributes on which the files of one series must agree (within the tolerances), or it is refused.
GEOMETRY_ATTRIBUTES = ("FrameOfReferenceUID", "ImageOrientationPatient", "PixelSpacing")
#: Attributes of multi-frame images on which the frames of one series must agree, or it is refused.
FRAME_ATTRIBUTES = ("StackID", "TemporalPositionIndex")
GROUPING_POLICY = (
    "A series is the files that agree on PatientID, StudyInstanceUID, SeriesInstanceUID, Modality, "
    "FrameOfReferenceUID, ImageOrientationPatient (cosines within "
    f"{ORIENTATION_TOLERANCE:g}) and PixelSpacing (relative difference within {PIXEL_SPACING_TOLERANCE:g}). "
    "Files sharing a SeriesInstanceUID but disagreeing on patient, study or modality are never merged "
    "or split: the whole SeriesInstanceUID is refused and none of its files is used. Disagreement on "
    "geometry (frame of reference, orientation, pixel spacing) refuses the series as mixed geometry. "
    "Reasons name attributes and count values; they never contain the values."
)
MULTI_FRAME_POLICY = (
    "A multi-frame image (Enhanced MR, Legacy Converted Enhanced MR) is read frame by frame: each frame is "
    "one slice, with the position, orientation, pixel spacing, slice thickness and rescale of its per-frame "
    "functional groups, else of the shared functional groups, else of the top-level attributes. Frames "
    "follow the series rules exactly as single-frame files do (a file mixing orientations is mixed "
    "geometry). A series whose frames carry more than one StackID or TemporalPositionIndex (several "
    "stacks or time points) is ambiguous and refused, never merged into one volume. A multi-frame image "
    "without functional groups is not used."
)
