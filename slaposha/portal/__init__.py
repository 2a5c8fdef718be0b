"""The portal: many slaposha clusters in one place (``slaposha portal
serve``), as OpenSVC's web portal gathers what the agents of many clusters
report.

- :mod:`slaposha.portal.config`: the portal file (its ``[portal]`` and one
  ``[cluster <name>]`` per cluster: endpoints, site, the operator
  certificate the portal shows there);
- :mod:`slaposha.portal.feed`: one cluster followed live, from its agents'
  event stream and their own views;
- :mod:`slaposha.portal.view`: the aggregated view and its filters;
- :mod:`slaposha.portal.server`: the HTTPS server, its page
  (``page.html``), its JSON API (``openapi.json``) and the actions it
  relays.

Who may use it: certificates of the portal's own CA (``slaposha portal
init``), with the roles of the agents' API. The portal holds one operator
certificate per cluster and never a CA key; what a user may do there is
what both the user's role and that certificate allow. It keeps no state of
its own: what it shows is what the clusters said last.
"""
