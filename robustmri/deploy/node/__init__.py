"""A DICOM node between a PACS and the model: receives studies by C-STORE (:mod:`.scp`), keeps them in a durable
queue (:mod:`.queue`), answers each study with :func:`robustmri.deploy.dicom.study.infer_dicom` (:mod:`.worker`)
and sends the SR back by C-STORE (:mod:`.sender`); the ``robustmri-node`` command is :mod:`.cli`."""
