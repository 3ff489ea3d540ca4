"""DICOM studies in, reports and DICOM SR out: read headers (:mod:`.headers`), check series (:mod:`.integrity`),
select them (:mod:`.selection`, :mod:`.series_rule`), decode pixels (:mod:`.pixels`), classify a series
(:mod:`.classify`), answer per study (:mod:`.study`), write reports (:mod:`.report`) and SR (:mod:`.sr`)."""
