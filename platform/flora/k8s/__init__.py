"""Kubernetes (KubeRay) support: the RayService's ``serveConfigV2``, kept equal to deployments/.

``flora k8s render`` writes each overlay's ``serve-config.yaml`` (a kustomize patch that sets
``spec.serveConfigV2``) from a Serve config file in deployments/, and ``--check`` fails when a
committed one has drifted. ``flora.k8s.rayservice`` checks the RayService fields KubeRay needs.
"""

from flora.k8s.render import TARGETS, Outcome, Target, render

__all__ = ["TARGETS", "Outcome", "Target", "render"]
