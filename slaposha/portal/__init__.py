"""The portal: many slaposha clusters in one place.

- :mod:`slaposha.portal.config`: the portal file (its ``[portal]`` and one
  ``[cluster <name>]`` per cluster: endpoints, site, the operator
  certificate the portal shows there).
"""
