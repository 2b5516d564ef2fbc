"""Between MRML nodes and images, and from a segmentation result to nodes in a scene.

Qt-free: every function takes the scene explicitly and uses only vtkMRML* classes and the static helpers of
``vtkSlicerSegmentationsModuleLogic``, so it runs with slicer-core (tests, web app) and inside Slicer.
Importing it costs nothing in Slicer (numpy, VTK and MRML are loaded there): SimpleITK is imported only by
the functions that take or return SimpleITK images; the panel's path reads the child's files with
Slicer's own NRRD reader instead.

Geometry: a volume node keeps its voxels in a vtkImageData and places them with its IJK-to-RAS matrix;
SimpleITK (like ITK, NRRD and DICOM) places voxels in LPS. The two frames differ by the sign of the first
two axes.

A run builds every new object before it touches the scene, so a failed or cancelled run leaves the scene
as it was. Outputs remember their input (a node reference) so that a second run updates them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import slicer
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from .errors import Cancelled, UserError
from .protocol import Geometry
from .segment_description import PANCREAS_SEGMENT

# Slicer keeps its Teem classes out of the ``slicer`` namespace: they are the top-level module ``vtkTeem``
# (Base/Python/vtkTeem.py), imported as Slicer's own modules do (Modules/Scripted/DataProbe/DataProbe.py:4,
# v5.12.0; the same in 5.8 and 5.10). Only slicer-core (tests, web app) flattens them into ``slicer``.
try:
    from vtkTeem import vtkTeemNRRDReader
except ImportError:
    from slicer import vtkTeemNRRDReader

if TYPE_CHECKING:  # the engine imports torch; converting volumes does not need it
    import SimpleITK as sitk

    from .engine import ProgressCallback, SegmentationResult, Segmenter

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
INPUT_ROLE = "attentionUNetSegInput"  # output node -> the volume it was computed from
OUTPUT_ATTRIBUTE = "AttentionUNetSeg.Output"  # "segmentation" or "attention <map name>"
SEGMENTATION_OUTPUT = "segmentation"
ATTENTION_OUTPUT = "attention "
ATTENTION_SCALE = 255  # = engine.ATTENTION_SCALE (a test checks): maps are UInt8, value / 255 = coefficient
ATTENTION_LOWER_THRESHOLD = 0.2  # coefficients below this (and 0 off the body) are transparent
DEFAULT_ATTENTION_OPACITY = 0.5
# Panel label -> (colour node kind, type constant); the first is the default.
ATTENTION_COLOUR_MAPS = {
    "Heat": ("PET", "PETheat"),
    "Rainbow": ("PET", "PETrainbow"),
    "Hot metal blue": ("PET", "PEThotMetalBlue"),
    "Iron": ("table", "Iron"),
}
DEFAULT_COLOUR_MAP = next(iter(ATTENTION_COLOUR_MAPS))


@dataclass
class SegmentationOutputs:
    """The nodes a run wrote: the segmentation, and one volume per attention map name."""

    segmentation_node: slicer.vtkMRMLSegmentationNode
    attention_nodes: dict[str, slicer.vtkMRMLScalarVolumeNode] = field(default_factory=dict)


@dataclass
class VtkVolume:
    """Voxels at unit spacing and zero origin, placed by an IJK-to-RAS matrix (how a volume node holds them)."""

    image_data: vtkImageData
    ijk_to_ras: vtkMatrix4x4


def volume_node_voxels(volume_node) -> tuple[np.ndarray, Geometry]:
    """A (k, j, i) view of the voxels of a scalar volume node, in their own type, and their LPS geometry.

    The geometry is the node's own frame: a parent transform is not applied (outputs go under the same one).
    """
    name = volume_node.GetName() or volume_node.GetID()
    image_data = volume_node.GetImageData()
    scalars = image_data.GetPointData().GetScalars() if image_data is not None else None
    if scalars is None or scalars.GetNumberOfTuples() == 0:
        raise UserError(f"volume {name} has no voxels", "it holds no scalar image data", "load a CT volume first")
    if scalars.GetNumberOfComponents() != 1:
        raise UserError(f"volume {name} has several components per voxel", "a CT has one", "choose a scalar CT")
    voxels = numpy_support.vtk_to_numpy(scalars).reshape(image_data.GetDimensions()[::-1])
    ijk_to_ras = _matrix_to_numpy(_ijk_to_ras(volume_node))
    first_voxel = image_data.GetExtent()[::2]  # IJK of the first stored voxel (0, 0, 0 in almost every volume)
    ijk_to_ras[:3, 3] = ijk_to_ras[:3, :3] @ first_voxel + ijk_to_ras[:3, 3]
    return voxels, _lps_geometry(ijk_to_ras)


def volume_node_to_image(volume_node) -> sitk.Image:
    """The voxels of a scalar volume node as a SimpleITK image in their own pixel type, placed in LPS."""
    import SimpleITK as sitk

    voxels, geometry = volume_node_voxels(volume_node)
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def image_to_volume_node(image: sitk.Image, scene, name: str, node=None) -> slicer.vtkMRMLScalarVolumeNode:
    """Put ``image`` in ``node`` (voxels and geometry), or in a new scalar volume node added to ``scene``."""
    volume = _vtk_volume(image)
    new = node is None
    node = slicer.vtkMRMLScalarVolumeNode() if new else node
    was_modifying = node.StartModify()
    node.SetName(name)
    _fill_volume_node(node, volume)
    node.EndModify(was_modifying)
    if new:
        scene.AddNode(node)
        node.CreateDefaultDisplayNodes()
    return node


def read_volume_file(path) -> VtkVolume:
    """An NRRD file read with Slicer's own reader, as a volume node would hold it (no SimpleITK, no copy)."""
    reader = vtkTeemNRRDReader()
    reader.SetFileName(str(path))
    reader.Update()
    if reader.GetReadStatus():
        raise UserError(f"cannot read {path}", "the segmentation process wrote an unreadable file", "try again")
    image_data = vtkImageData()
    image_data.ShallowCopy(reader.GetOutput())
    image_data.SetSpacing(1.0, 1.0, 1.0)
    image_data.SetOrigin(0.0, 0.0, 0.0)
    ijk_to_ras = vtkMatrix4x4()
    vtkMatrix4x4.Invert(reader.GetRasToIjkMatrix(), ijk_to_ras)
    return VtkVolume(image_data, ijk_to_ras)


def import_result(
    scene,
    input_volume_node,
    mask: sitk.Image,
    attention_maps: dict[str, sitk.Image],
    segmentation_node=None,
    closed_surface: bool = True,
) -> SegmentationOutputs:
    """:func:`import_volumes` for SimpleITK images (the mask any integer type, maps UInt8)."""
    import SimpleITK as sitk

    volumes = {name: _vtk_volume(image) for name, image in attention_maps.items()}
    return import_volumes(scene, input_volume_node, _vtk_volume(sitk.Cast(mask != 0, sitk.sitkUInt8)), volumes,
                          segmentation_node, closed_surface)


def import_volumes(
    scene,
    input_volume_node,
    mask: VtkVolume,
    attention_maps: dict[str, VtkVolume],
    segmentation_node=None,
    closed_surface: bool = False,
) -> SegmentationOutputs:
    """Write a mask (UInt8, 1 = pancreas) and attention maps into ``scene`` as nodes of ``input_volume_node``.

    The mask becomes the "Pancreas" segment of ``segmentation_node`` (or of the segmentation a previous
    run made for this input, or of a new one); each attention map a volume "<input> attention <map>".
    Nodes of a previous run on the same input are updated, not duplicated. Everything is built before the
    scene changes. ``closed_surface`` also builds the 3D surface (marching cubes: seconds on a large CT).
    The attention maps are not shown; call :func:`show_attention` for that. Raises ``Cancelled`` when the
    input is no longer in the scene (the scene was closed while the result waited to be imported).
    """
    if not _in_scene(scene, input_volume_node):  # the panel runs Slicer's events (Close Scene too) before this
        raise Cancelled("the scene was closed during the import")
    if segmentation_node is not None and not _in_scene(scene, segmentation_node):
        raise ValueError("segmentation_node must be a node of the scene")
    _ensure_surface_conversion()
    input_name = input_volume_node.GetName() or "Volume"
    previous = _previous_outputs(scene, input_volume_node)
    segment = _pancreas_segment(mask)
    target = segmentation_node or previous.segmentation_node
    new_segmentation = _new_segmentation_node(f"{input_name} segmentation", segment) if target is None else None
    heat_colour_id, new_heat_colour = _colour_node(scene, DEFAULT_COLOUR_MAP)
    attention = {
        name: _attention_node_and_display(previous.attention_nodes.get(name), heat_colour_id) for name in attention_maps
    }

    # Only now does the scene change; nothing below is expected to fail on valid nodes.
    if new_heat_colour is not None:
        scene.AddNode(new_heat_colour)
    if new_segmentation is not None:
        scene.AddNode(new_segmentation)
    segmentation = new_segmentation or target
    if previous.segmentation_node not in (None, segmentation):
        previous.segmentation_node.RemoveAttribute(OUTPUT_ATTRIBUTE)  # the input's latest result is elsewhere now
    _mark_output(segmentation, input_volume_node, SEGMENTATION_OUTPUT)
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(input_volume_node)  # after the transform is set
    if new_segmentation is None:
        _replace_pancreas(segmentation, segment)
    if closed_surface:
        segmentation.CreateClosedSurfaceRepresentation()
    if segmentation.GetDisplayNode() is None:
        segmentation.CreateDefaultDisplayNodes()
    outputs = SegmentationOutputs(segmentation)
    for name, (node, display) in attention.items():
        outputs.attention_nodes[name] = _write_attention_node(scene, input_volume_node, name, node, display,
                                                              attention_maps[name])
    return outputs


def add_attention_map(scene, input_volume_node, name: str, volume: VtkVolume):
    """Put one more attention map of the input's latest run into the scene (or update the one there)."""
    existing = _previous_outputs(scene, input_volume_node).attention_nodes.get(name)
    colour_id, new_colour = _colour_node(scene, DEFAULT_COLOUR_MAP)
    node, display = _attention_node_and_display(existing, colour_id)
    if new_colour is not None:
        scene.AddNode(new_colour)
    return _write_attention_node(scene, input_volume_node, name, node, display, volume)


def show_attention(scene, attention_node, opacity: float = DEFAULT_ATTENTION_OPACITY, visible: bool = True,
                   colour_map: str = DEFAULT_COLOUR_MAP) -> None:
    """Show ``attention_node`` as the foreground layer over its input in every slice view, or hide it."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be between 0 and 1, not {opacity}")
    input_node = attention_node.GetNodeReference(INPUT_ROLE)
    if visible:
        set_attention_colour_map(scene, attention_node, colour_map)
    for composite in _nodes_of_class(scene, "vtkMRMLSliceCompositeNode"):
        if visible:
            was_modifying = composite.StartModify()
            if input_node is not None:
                composite.SetBackgroundVolumeID(input_node.GetID())
            composite.SetForegroundVolumeID(attention_node.GetID())
            composite.SetForegroundOpacity(opacity)
            composite.EndModify(was_modifying)
        elif composite.GetForegroundVolumeID() == attention_node.GetID():
            composite.SetForegroundVolumeID(None)


def set_attention_colour_map(scene, attention_node, label: str) -> None:
    """Colour an attention volume with one of :data:`ATTENTION_COLOUR_MAPS`, adding the colour node if missing."""
    node_id, new_colour = _colour_node(scene, label)
    if new_colour is not None:
        scene.AddNode(new_colour)
    attention_node.GetDisplayNode().SetAndObserveColorNodeID(node_id)


def segment_volume_node(
    scene,
    volume_node,
    segmenter: Segmenter,
    progress: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
    segmentation_node=None,
    attention_names: tuple[str, ...] = ("combined",),
) -> tuple[SegmentationOutputs, SegmentationResult]:
    """Segment the pancreas in a volume node in this process and put the result in the scene, the first map
    shown. Raises ``UserError`` for bad input and ``Cancelled`` when ``cancel()`` returns True; in both cases
    the scene is exactly as it was."""
    image = volume_node_to_image(volume_node)
    result = segmenter.segment(image, progress=progress, cancel=cancel, maps=attention_names)
    outputs = import_result(scene, volume_node, result.mask, result.attention_maps, segmentation_node)
    if attention_names:
        show_attention(scene, outputs.attention_nodes[attention_names[0]])
    return outputs, result


# --- geometry ------------------------------------------------------------------------------------------


def _ijk_to_ras(volume_node) -> vtkMatrix4x4:
    matrix = vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix


def _matrix_to_numpy(matrix: vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _lps_geometry(ijk_to_ras: np.ndarray) -> Geometry:
    axes = ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    return Geometry(tuple(spacing.tolist()), tuple((LPS_TO_RAS @ ijk_to_ras[:3, 3]).tolist()),
                    tuple((LPS_TO_RAS @ (axes / spacing)).ravel().tolist()))


def _ras_matrix(image: sitk.Image) -> vtkMatrix4x4:
    """IJK-to-RAS of a SimpleITK image (whose geometry is in LPS)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    ijk_to_ras[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin())
    matrix = vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, ijk_to_ras[r, c])
    return matrix


def _vtk_volume(image: sitk.Image) -> VtkVolume:
    """A copy of the voxels of a SimpleITK image, as a volume node holds them."""
    import SimpleITK as sitk

    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("expected a 3D scalar image")
    voxels = sitk.GetArrayViewFromImage(image)  # (k, j, i): i varies fastest, as VTK stores points
    image_data = vtkImageData()
    image_data.SetDimensions(image.GetSize())
    image_data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(voxels.ravel(), deep=True))
    return VtkVolume(image_data, _ras_matrix(image))


def _fill_volume_node(node, volume: VtkVolume) -> None:
    node.SetIJKToRASMatrix(volume.ijk_to_ras)
    node.SetAndObserveImageData(volume.image_data)


# --- outputs -------------------------------------------------------------------------------------------


def _in_scene(scene, node) -> bool:
    return scene.GetNodeByID(node.GetID() or "") is node


def _nodes_of_class(scene, class_name: str) -> list:
    return [scene.GetNthNodeByClass(i, class_name) for i in range(scene.GetNumberOfNodesByClass(class_name))]


def _mark_output(node, input_volume_node, kind: str) -> None:
    node.SetAttribute(OUTPUT_ATTRIBUTE, kind)
    node.SetNodeReferenceID(INPUT_ROLE, input_volume_node.GetID())
    node.SetAndObserveTransformNodeID(input_volume_node.GetTransformNodeID())  # same frame as the input
    _place_beside_input(node, input_volume_node)


def _place_beside_input(node, input_volume_node) -> None:
    """In the Data module an output sits beside its input (in the DICOM study), not at the scene's top level.

    Slicer gives every added node a top-level item; an output the user has moved elsewhere stays there.
    """
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    input_item = hierarchy.GetItemByDataNode(input_volume_node)
    if not input_item:
        return
    parent = hierarchy.GetItemParent(input_item)
    item = hierarchy.GetItemByDataNode(node)
    if not item:
        hierarchy.CreateItem(parent, node)
    elif hierarchy.GetItemParent(item) == hierarchy.GetSceneItemID():
        hierarchy.SetItemParent(item, parent)


def _previous_outputs(scene, input_volume_node) -> SegmentationOutputs:
    """The nodes an earlier run wrote for this input (the segmentation may be None)."""
    outputs = SegmentationOutputs(None)
    for node in _nodes_of_class(scene, "vtkMRMLNode"):
        kind = node.GetAttribute(OUTPUT_ATTRIBUTE)
        if not kind or node.GetNodeReferenceID(INPUT_ROLE) != input_volume_node.GetID():
            continue
        if kind == SEGMENTATION_OUTPUT and node.IsA("vtkMRMLSegmentationNode"):
            outputs.segmentation_node = node
        elif kind.startswith(ATTENTION_OUTPUT) and node.IsA("vtkMRMLScalarVolumeNode"):
            outputs.attention_nodes[kind[len(ATTENTION_OUTPUT) :]] = node
    return outputs


def _pancreas_segment(mask: VtkVolume) -> slicer.vtkSegment:
    labelmap = slicer.vtkOrientedImageData()
    labelmap.ShallowCopy(mask.image_data)
    labelmap.SetImageToWorldMatrix(mask.ijk_to_ras)
    segment = slicer.vtkSegment()
    segment.SetName(PANCREAS_SEGMENT["name"])
    segment.SetColor(*(c / 255.0 for c in PANCREAS_SEGMENT["color"]))
    segment.SetTag(segment.GetTerminologyEntryTagName(), PANCREAS_SEGMENT["terminology"])  # as Slicer 5.8+ stores it
    segment.SetLabelValue(1)
    segment.AddRepresentation(_labelmap_name(), labelmap)
    return segment


def _labelmap_name() -> str:
    return slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()


def _surface_name() -> str:
    return slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()


def _ensure_surface_conversion() -> None:
    """Slicer registers the labelmap-to-surface rule when its Segmentations module starts; slicer-core does not.
    A segmentation copies the rules when it is made, so this runs before a segmentation node is made."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    rules = factory.GetConverterRules()
    if not any(
        r.GetSourceRepresentationName() == _labelmap_name() and r.GetTargetRepresentationName() == _surface_name()
        for r in rules
    ):
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())


def _new_segmentation_node(name: str, segment) -> slicer.vtkMRMLSegmentationNode:
    """A segmentation node outside any scene, holding ``segment``."""
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(name)
    segmentation = node.GetSegmentation()
    segmentation.SetSourceRepresentationName(_labelmap_name())
    segmentation.AddSegment(segment, segment.GetName())
    return node


def _replace_pancreas(node, segment) -> None:
    """Replace the voxels of the node's "Pancreas" segment (keeping its display settings), or add the segment.
    A surface already shown is rebuilt by the segmentation itself."""
    segmentation = node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(segment.GetName())
    if segment_id:
        labelmap = segment.GetRepresentation(_labelmap_name())
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            labelmap, node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
        )
        # The known constant, not segment.GetTerminology(): that arrived in Slicer 5.10, and 5.8 is supported.
        segmentation.GetSegment(segment_id).SetTag(segment.GetTerminologyEntryTagName(),
                                                   PANCREAS_SEGMENT["terminology"])
    else:
        segmentation.AddSegment(segment, segmentation.GenerateUniqueSegmentID(segment.GetName()))


def _colour_node(scene, label: str):
    """ID of one of Slicer's colour maps (:data:`ATTENTION_COLOUR_MAPS`), and a new node to add when the scene
    lacks it (Slicer adds them all at start-up; a bare slicer-core scene has none)."""
    kind, type_name = ATTENTION_COLOUR_MAPS[label]
    if kind == "PET":
        node_class = slicer.vtkMRMLPETProceduralColorNode
        node_id = slicer.vtkMRMLColorLogic.GetPETColorNodeID(getattr(node_class, type_name))
    else:
        node_class = slicer.vtkMRMLColorTableNode
        node_id = slicer.vtkMRMLColorLogic.GetColorTableNodeID(getattr(node_class, type_name))
    if scene.GetNodeByID(node_id) is not None:
        return node_id, None
    node = node_class()
    node.SetType(getattr(node_class, type_name))
    node.SetName(node.GetTypeAsString())
    node.SetSingletonTag(node.GetTypeAsString())  # gives the same ID as Slicer's, so it is never made twice
    node.SaveWithSceneOff()
    return node_id, node


def _attention_node_and_display(existing, colour_node_id: str):
    """The node to write an attention map into (a previous run's, or a new one), and a display node to give
    it when it has none: heat colours over the 8-bit range, low values (and 0 off the body) transparent."""
    node = existing or slicer.vtkMRMLScalarVolumeNode()
    if node.GetDisplayNode() is not None:
        return node, None
    display = slicer.vtkMRMLScalarVolumeDisplayNode()
    display.SetAndObserveColorNodeID(colour_node_id)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, ATTENTION_SCALE)
    display.AutoThresholdOff()
    display.SetThreshold(ATTENTION_LOWER_THRESHOLD * ATTENTION_SCALE, ATTENTION_SCALE)
    display.ApplyThresholdOn()
    display.SetInterpolate(1)
    return node, display


def _write_attention_node(scene, input_volume_node, name: str, node, display, volume: VtkVolume):
    was_modifying = node.StartModify()
    node.SetName(f"{input_volume_node.GetName() or 'Volume'} attention {name}")
    _fill_volume_node(node, volume)
    node.EndModify(was_modifying)
    if node.GetScene() is None:
        scene.AddNode(node)
    if display is not None:
        scene.AddNode(display)
        node.SetAndObserveDisplayNodeID(display.GetID())
    _mark_output(node, input_volume_node, ATTENTION_OUTPUT + name)
    return node


def segment_voxels(segmentation_node, segment_name: str, volume_node) -> np.ndarray:
    """A segment as a UInt8 (k, j, i) mask on the voxels of ``volume_node`` (1 inside), whatever the
    segmentation's own geometry (a segment edited in the Segment Editor may have grown past its first grid)."""
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(segment_name)
    if not segment_id:
        raise UserError(f"{segmentation_node.GetName()} has no {segment_name} segment", "",
                        f"segment the pancreas first, or name the segment {segment_name}")
    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(volume_node.GetImageData().GetExtent())
    reference.SetImageToWorldMatrix(_ijk_to_ras(volume_node))
    on_volume = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference, on_volume)
    shape = volume_node.GetImageData().GetDimensions()[::-1]
    scalars = on_volume.GetPointData().GetScalars()
    if scalars is None:  # an empty segment has no voxels at all
        return np.zeros(shape, np.uint8)
    return (numpy_support.vtk_to_numpy(scalars).reshape(shape) != 0).astype(np.uint8)
