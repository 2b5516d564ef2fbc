"""What the result is, for every front end: the *Pancreas* segment's name, colour and terminology.

Dependency-free, so that the Slicer module and the MRML bridge can read it without importing SimpleITK.
"""

PANCREAS_SEGMENT = {
    "name": "Pancreas",
    "color": (249, 180, 111),
    # Slicer terminology string: context~category~type~modifier~anatomic context~region~region modifier (SNOMED
    # CT codes). The DICOM master list is the full standard list; TotalSegmentator labels its pancreas the same way.
    "terminology": "Segmentation category and type - DICOM master list"
    "~SCT^123037004^Anatomical Structure~SCT^15776009^Pancreas~^^~Anatomic codes - DICOM master list~^^~^^",
}
