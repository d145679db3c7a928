{{/* Kept to plain lookups, include, if, quote, toYaml and nindent: the chart test renders
these templates with a small renderer of exactly that subset (tests/unit/deploy). */}}
{{- define "coderepair.fullname" -}}
{{ .Release.Name }}-coderepair
{{- end -}}

{{- define "coderepair.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{- define "coderepair.labels" -}}
app.kubernetes.io/name: coderepair
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "coderepair.s3env" -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.s3.name }}
      key: {{ .Values.secrets.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.s3.name }}
      key: {{ .Values.secrets.s3.secretAccessKeyKey }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3Region | quote }}
{{- end -}}

{{- define "coderepair.dbenv" -}}
- name: CODEREPAIR_COORDINATOR_DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.database.name }}
      key: {{ .Values.secrets.database.urlKey }}
{{- end -}}
